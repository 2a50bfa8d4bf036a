"""Request bodies are bounded before anything parses them, and with auth on a request without a valid key is refused
before its body is read (`serve_app.body_limits`)."""

from __future__ import annotations

import asyncio
import json

import pytest

from serve_app.auth import ApiKeyAuth
from serve_app.body_limits import BodyLimitMiddleware, edit_body_limit
from serve_app.settings import ServiceSettings

KEY = "k" * 32


def settings(**overrides) -> ServiceSettings:
    return ServiceSettings(api_keys=[{"tenant": "acme", "key": KEY}], **overrides)


class Recorder:
    """An ASGI app that reads its body and says what it got, and a `receive` that counts what was pulled."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = list(chunks)
        self.pulled = 0
        self.app_body: bytes | None = None

    async def receive(self):
        self.pulled += 1
        chunk = self.chunks.pop(0) if self.chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}

    async def app(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.app_body = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(middleware: BodyLimitMiddleware, recorder: Recorder, path: str, headers: dict[str, str]) -> tuple[int, dict]:
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"", "client": ("127.0.0.1", 1),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(middleware(scope, recorder.receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], (json.loads(body) if sent[0]["status"] != 200 else {})


def test_an_unauthenticated_post_is_refused_before_its_body_is_read():
    s = settings()
    recorder = Recorder([b"x" * 65536] * 100)
    status, body = call(BodyLimitMiddleware(recorder.app, s, ApiKeyAuth(s)), recorder, "/v1/images/generations",
                        {"content-type": "application/json", "content-length": str(100 * 65536)})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert recorder.pulled == 0 and recorder.app_body is None


def test_a_declared_length_over_the_bound_is_413_before_reading():
    s = settings()
    recorder = Recorder([b"{}"])
    status, body = call(BodyLimitMiddleware(recorder.app, s, ApiKeyAuth(s)), recorder, "/v1/images/generations",
                        {"authorization": f"Bearer {KEY}", "content-length": str(s.max_json_body_bytes + 1)})
    assert status == 413 and body["error"]["code"] == "request_too_large" and body["error"]["param"] == "request"
    assert recorder.pulled == 0


def test_a_chunked_body_is_cut_off_past_the_bound():
    s = settings()
    recorder = Recorder([b"x" * 65536] * 100)  # 6.5 MB, no declared length
    status, _ = call(BodyLimitMiddleware(recorder.app, s, ApiKeyAuth(s)), recorder, "/v1/images/generations",
                     {"authorization": f"Bearer {KEY}"})
    assert status == 413
    assert recorder.pulled == s.max_json_body_bytes // 65536 + 1 and recorder.app_body is None


def test_a_body_within_the_bound_reaches_the_app_whole():
    s = settings()
    chunks = [b'{"prompt": "', b"a" * 1000, b'"}']
    recorder = Recorder(chunks)
    status, _ = call(BodyLimitMiddleware(recorder.app, s, ApiKeyAuth(s)), recorder, "/v1/images/generations",
                     {"authorization": f"Bearer {KEY}"})
    assert status == 200 and recorder.app_body == b"".join(chunks)


def test_edits_get_the_larger_bound_and_read_their_body_themselves():
    s = settings()
    limit = edit_body_limit(s)
    assert limit > 2 * s.max_image_bytes
    recorder = Recorder([b"x" * (s.max_json_body_bytes + 1)])
    status, _ = call(BodyLimitMiddleware(recorder.app, s, ApiKeyAuth(s)), recorder, "/v1/images/edits",
                     {"authorization": f"Bearer {KEY}"})
    assert status == 200 and len(recorder.app_body) == s.max_json_body_bytes + 1
    recorder = Recorder([b"{}"])
    status, _ = call(BodyLimitMiddleware(recorder.app, s, ApiKeyAuth(s)), recorder, "/v1/images/edits",
                     {"authorization": f"Bearer {KEY}", "content-length": str(limit + 1)})
    assert status == 413 and recorder.pulled == 0


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits"])
def test_the_app_answers_an_oversized_body_413_naming_the_request(api_client, path):
    huge = json.dumps({"prompt": "a" * (api_client.app.state.settings.max_json_body_bytes + 10)})
    if path.endswith("edits"):
        huge = "x" * (edit_body_limit(api_client.app.state.settings) + 10)
    r = api_client.post(path, content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["param"] == "request" and r.headers.get("x-request-id")
