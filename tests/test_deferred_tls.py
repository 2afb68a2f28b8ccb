"""The warm runner's client TLS contexts read their certificates at the first handshake (real TLS
to a loopback server with a certificate made here)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import httpx
import pytest
from test_fetch import PNG, running_server, self_signed_cert

from deployments import deferred_tls
from deployments.deferred_tls import DeferredCAContext


def loaded_ca_count(context: ssl.SSLContext) -> int:
    """How many CA certificates the context holds now (the base method: it loads nothing)."""
    return ssl.SSLContext.cert_store_stats(context)["x509_ca"]


@pytest.fixture
def tls_server(tmp_path: Path):
    cert, key = self_signed_cert(tmp_path, "localhost")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    with running_server(server_context) as server:
        yield server, cert


def test_the_certificates_are_read_at_the_first_handshake_and_then_trusted(tls_server) -> None:
    server, cert = tls_server
    context = deferred_tls.create_default_context(cafile=str(cert))
    assert isinstance(context, DeferredCAContext)
    assert loaded_ca_count(context) == 0  # made, nothing read yet
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    with httpx.Client(verify=context, trust_env=False) as client:
        response = client.get(f"https://localhost:{server.port}/img.png")
    assert response.content == PNG
    assert loaded_ca_count(context) == 1


def test_an_asyncio_connection_reads_them_too(tls_server) -> None:
    server, cert = tls_server
    context = deferred_tls.create_default_context(cafile=str(cert))

    async def fetch() -> bytes:
        async with httpx.AsyncClient(verify=context, trust_env=False) as client:
            return (await client.get(f"https://localhost:{server.port}/img.png")).content

    assert asyncio.run(fetch()) == PNG  # anyio's TLS stream: wrap_bio
    assert loaded_ca_count(context) == 1


def test_a_server_outside_the_ca_file_is_still_refused(tls_server, tmp_path: Path) -> None:
    server, _ = tls_server
    other, _ = self_signed_cert(tmp_path, "other")
    context = deferred_tls.create_default_context(cafile=str(other))
    with httpx.Client(verify=context, trust_env=False) as client, pytest.raises(
        httpx.ConnectError, match="certificate verify failed"
    ):
        client.get(f"https://localhost:{server.port}/img.png")


def test_without_a_ca_file_the_system_certificates_are_read_on_first_use() -> None:
    context = deferred_tls.create_default_context()
    assert isinstance(context, DeferredCAContext) and loaded_ca_count(context) == 0
    system = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    system.load_default_certs(ssl.Purpose.SERVER_AUTH)
    assert context.cert_store_stats() == system.cert_store_stats()  # asking what it trusts loads them


def test_what_it_does_not_defer_goes_to_the_standard_library(tmp_path: Path) -> None:
    server_side = deferred_tls.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert type(server_side) is ssl.SSLContext
    with pytest.raises(FileNotFoundError):  # a missing CA file fails at once, as it always did
        deferred_tls.create_default_context(cafile=str(tmp_path / "missing.pem"))


def test_prefect_clients_make_their_contexts_where_install_defers_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Prefect API client builds its TLS context with ``ssl.create_default_context``, the function
    ``install()`` replaces: a client of a plain-http API then never reads a certificate."""
    from prefect.client.orchestration import SyncPrefectClient

    monkeypatch.setattr(ssl, "create_default_context", ssl.create_default_context)  # restored afterwards
    deferred_tls.install()
    assert ssl.create_default_context is deferred_tls.create_default_context
    made: list[ssl.SSLContext] = []

    def recording(*args, **kwargs) -> ssl.SSLContext:
        made.append(deferred_tls.create_default_context(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(ssl, "create_default_context", recording)
    with SyncPrefectClient("http://127.0.0.1:9/api"):
        pass
    assert made and all(isinstance(c, DeferredCAContext) and loaded_ca_count(c) == 0 for c in made)
