"""Reading the API's server-sent events in tests: testing/sse.py (benchmarks and testing/multinode.py use it too)."""

from testing.sse import parse_sse, pixels  # noqa: F401
