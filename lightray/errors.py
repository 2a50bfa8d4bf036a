"""What the core raises about a request it cannot serve: the field at fault, what is wrong, and the kind of
refusal, as the exception's class.

No HTTP here: the edge (`serve_app.errors`) answers each kind with its status code, and adds the kinds only the
edge meets (authentication, quotas, timeouts, content types). Every class keeps the same constructor, so a stage's
refusal crosses a Ray handle whole (`RequestError.__reduce__`) and the ingress answers it as its own.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A request the service cannot serve as asked: a value the request should not have sent (the base kind, an
    invalid value), or, as a subclass, another kind of refusal."""

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        """The offending field (OpenAI's error `param`): "prompt", "lora[1]", "image[0]", …"""
        self.message = message
        """What is wrong, in words for the client."""
        self.code = code
        """What is wrong, as a word for code (OpenAI's error `code`): "invalid_value", "adapter_not_found", …"""

    def __reduce__(self):
        # Whole across a Ray handle: a stage's refusal reaches the ingress as itself, kind included.
        return type(self), (self.param, self.message, self.code)


class NotFound(RequestError):
    """What the request names does not exist, or is not the caller's to see (a model, an adapter, a stored
    image)."""


class Incompatible(RequestError):
    """What the request names exists but cannot serve it (an adapter trained for another base model, or whose
    registry entry is damaged)."""


class TooLarge(RequestError):
    """An input is past its bound in bytes (a body, an upload). A picture past its pixel budget is an invalid
    value: its bytes were accepted, the request asked too much of it."""
