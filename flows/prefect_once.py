"""Prefect API clients built by dreamflow: with the configured credentials, and, for callers with
their own retry policy, sending each request once and handing back a busy answer at once.

Prefect's HTTP clients retry 408/429/502/503 answers and dropped connections themselves, backing
off 2, 4, 8... s up to ``PREFECT_CLIENT_MAX_RETRIES`` times. With that setting at 0 they still
pause 2 s (with jitter) after a busy answer before returning it: in prefect 3.9.1's
``client/base.py``, ``_send_with_retry`` sleeps before its loop checks the retry count. The
embedded server on SQLite answers 503 whenever a write lost the race for the database lock, which
under load happens often and is over in milliseconds. Callers with their own retry policy (the
facade's gateway, the GPU slot) therefore make their client send once: the request goes through
Prefect's own send (CSRF token, attribution headers) with no status codes or exceptions to retry.
"""

from __future__ import annotations

import inspect
from typing import Any

BUSY_STATUS = frozenset({502, 503, 504})
"""Answers that mean "not now" (a busy server, a proxy before it): the request was not carried out,
so the caller's own retry policy asks again."""


def send_once(http_client: Any) -> None:
    """Make a ``PrefectHttpxAsyncClient`` or ``PrefectHttpxSyncClient`` (``client._client`` of a
    Prefect client) send each request once and return or raise what it gets."""
    send_with_retry = http_client._send_with_retry
    if inspect.iscoroutinefunction(send_with_retry):
        async def once_async(request: Any, send: Any, send_args: Any, send_kwargs: Any, **_: Any) -> Any:
            return await send_with_retry(request, send, send_args, send_kwargs, retry_codes=set(), retry_exceptions=())

        http_client._send_with_retry = once_async
    else:
        def once(request: Any, send: Any, send_args: Any, send_kwargs: Any, **_: Any) -> Any:
            return send_with_retry(request, send, send_args, send_kwargs, retry_codes=set(), retry_exceptions=())

        http_client._send_with_retry = once


def credentials() -> dict[str, str | None]:
    """The configured Prefect credentials (``PREFECT_API_AUTH_STRING`` for a self-hosted server
    with basic auth, ``PREFECT_API_KEY`` for Prefect Cloud), as ``get_client`` passes them: a client
    built directly gets them only when given."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

    return {"auth_string": PREFECT_API_AUTH_STRING.value(), "api_key": PREFECT_API_KEY.value()}


def async_client(api_url: str) -> Any:
    """A new ``PrefectClient`` of ``api_url`` with the configured credentials."""
    from prefect.client.orchestration import PrefectClient

    return PrefectClient(api_url, **credentials())


def sync_client_once() -> Any:
    """A new ``SyncPrefectClient`` of the configured API that sends each request once.

    Always a client of its own: ``get_client(sync_client=True)`` inside a task run returns the task
    engine's client, whose retries the engine's state updates rely on."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import PREFECT_API_URL

    client = SyncPrefectClient(PREFECT_API_URL.value(), **credentials())
    send_once(client._client)
    return client
