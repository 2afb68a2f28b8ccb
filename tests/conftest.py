"""Shared fixtures: a real SeaweedFS S3 server for the whole session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.store_s3 import S3Store
from s3server import WeedS3Server
from stackserver import RunningStack


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedS3Server]:
    """A started ``weed mini`` S3 server, stopped at the end of the session."""
    server = WeedS3Server(Path(tmp_path_factory.mktemp("weed")))
    with server:
        yield server


@pytest.fixture
def s3_store(s3_server: WeedS3Server) -> S3Store:
    """An S3Store on a fresh, uniquely named bucket of the session's server."""
    return S3Store(
        endpoint=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        bucket=f"test-{uuid.uuid4().hex[:16]}",
    )


@pytest.fixture(scope="session")
def stack(s3_server: WeedS3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """The whole dreamflow stack for real: Prefect server + process worker + facade, S3 on weed.

    Image URLs on loopback are allowed here because the tests serve photos from 127.0.0.1.
    """
    running = RunningStack.start(s3_server, Path(tmp_path_factory.mktemp("stack")))
    try:
        yield running
    finally:
        running.stop()
