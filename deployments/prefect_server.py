"""The stack's own Prefect server: Prefect's app under uvicorn, as ``prefect server start`` runs it,
with a retry time on its "busy" answers.

Prefect on SQLite answers 503 when a write cannot take the database: a transaction that read
first finds another connection writing, and SQLite refuses it at once rather than wait (its view
could be stale). The answer names no ``Retry-After``, and Prefect's clients then back off 2 s,
then 4, 8, 16 and 32. On the 2-core machine about one warm job in seven stalled so: the worker's
submission took 2.2 to 7.3 s instead of 0.3 (``bench/bench_pipeline.py``), and any state change
of a run can meet the same wait. Prefect's client waits as long as a ``Retry-After`` says (plus up
to 20 % jitter), so this server names one in every 503 that has none: 50 ms for a request's first
busy answer, four times longer each time the same request (same client address, method, path,
query and body: a retry) is busy again (0.05, 0.2, 0.8, 3.2, 12.8 s, at most 30). A write that met a brief lock goes through a moment later; one that keeps meeting a busy
database still waits 17 s over Prefect's five retries before its client gives up (62 s before).

    python -m deployments.prefect_server --host 127.0.0.1 --port 4200
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

FIRST_RETRY_S = 0.05
RETRY_FACTOR = 4.0
MAX_RETRY_S = 30.0
FORGET_AFTER_S = 2 * MAX_RETRY_S  # a request not asked again within this is a new one
MAX_TRACKED = 1024  # requests with busy answers in a row; all forgotten at once past this


class BusyRetryAfter:
    """ASGI middleware: a 503 without ``Retry-After`` gets one, longer each time the same request is
    answered 503 again."""

    def __init__(self, app: ASGIApp, first_s: float = FIRST_RETRY_S, factor: float = RETRY_FACTOR,
                 max_s: float = MAX_RETRY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.first_s, self.factor, self.max_s, self.clock = first_s, factor, max_s, clock
        self.busy: dict[tuple[str, str], tuple[int, float]] = {}  # request -> (503s in a row, last one)

    def retry_after(self, request: tuple[str, str]) -> float:
        """The wait to name in this request's busy answer."""
        now = self.clock()
        if len(self.busy) >= MAX_TRACKED:
            self.busy.clear()
        count, last = self.busy.get(request, (0, now))
        count = count + 1 if now - last <= FORGET_AFTER_S else 1
        self.busy[request] = (count, now)
        return min(self.max_s, self.first_s * self.factor ** (count - 1))

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("", 0))[0]
        digest = hashlib.sha256(f"{scope['method']} {scope['path']}?".encode() + scope.get("query_string", b""))

        async def receive_and_digest() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                digest.update(message.get("body", b""))
            return message

        async def send_with_retry_after(message: Message) -> None:
            if message["type"] == "http.response.start":
                request = (client, digest.hexdigest())
                if message["status"] != 503:
                    self.busy.pop(request, None)
                else:
                    headers = list(message.get("headers", []))
                    if not any(name.lower() == b"retry-after" for name, _ in headers):
                        headers.append((b"retry-after", f"{self.retry_after(request):.3f}".encode()))
                        message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive_and_digest, send_with_retry_after)


def serve(host: str, port: int) -> None:
    """Prefect's server app with its services and UI, as ``prefect server start`` serves it."""
    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import (
        PREFECT_SERVER_API_KEEPALIVE_TIMEOUT,
        PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
        PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT,
        PREFECT_SERVER_LOGGING_LEVEL,
    )

    uvicorn.run(
        BusyRetryAfter(create_app(final=True)),
        host=host,
        port=port,
        timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
        ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
        ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(),
        log_level=PREFECT_SERVER_LOGGING_LEVEL.value().lower(),
    )


def server_command(port: int) -> list[str]:
    """The command that serves the stack's Prefect server on 127.0.0.1:``port``."""
    return [sys.executable, "-m", "deployments.prefect_server", "--host", "127.0.0.1", "--port", str(port)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args(argv)
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
