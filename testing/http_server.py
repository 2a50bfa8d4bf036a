"""An ASGI app served over real HTTP from a thread of this process (uvicorn on a free loopback port), for tests
whose client is not Python's: a browser, or a client that must open its own connections."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


@contextmanager
def serve_in_thread(app, start_timeout_s: float = 30) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 (a port the OS picks) until the block ends; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"uvicorn did not start within {start_timeout_s} s")
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
