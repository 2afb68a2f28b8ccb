"""A client's webhook endpoint that records each delivery's status and answers none until the test
opens its gate (a receiver that hangs, then recovers)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOLD_LIMIT_S = 120.0


@dataclass
class GatedReceiver:
    url: str
    arrived: list[str] = field(default_factory=list)  # training_status of each delivery, attempts included
    gate: threading.Event = field(default_factory=threading.Event)


@contextmanager
def gated_receiver() -> Iterator[GatedReceiver]:
    """A receiver on a free loopback port; its gate opens when the block ends, whatever happens."""
    state = GatedReceiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            state.arrived.append(body["training_status"])
            state.gate.wait(HOLD_LIMIT_S)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        state.gate.set()
        server.shutdown()
