"""Client TLS contexts that read their trusted certificates at their first handshake, not when made.

Every Prefect API client builds an ``ssl.create_default_context(cafile=...)`` when it is created,
whether or not its API URL is ``https``, and reading a CA bundle of some 150 certificates takes
30 to 110 ms on the 2-core machine. A warm flow run creates eight of them (the engine's clients,
the run's log and event workers, the suspension observer's), most while the run starts: about
0.3 s of every job, for a local stack whose API is plain ``http`` and never makes a handshake.

``install()`` (called by the warm runner, so in every flow run it forks) makes
``ssl.create_default_context`` for servers return a context that reads its certificates just
before its first handshake (``wrap_socket`` for blocking sockets, ``wrap_bio`` for asyncio and
anyio streams) or when asked what it trusts. A context that is used for TLS trusts what it would
have trusted; one that never is, never reads the file. Standard library only.
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
from typing import Any

_original_create_default_context = ssl.create_default_context
_load_lock = threading.Lock()


class DeferredCAContext(ssl.SSLContext):
    """A client context whose trusted certificates are loaded on first use."""

    pending = False  # certificates still to load: ``cafile``, or the system's when it is None
    cafile: str | None = None

    def load_deferred(self) -> None:
        """Load the certificates this context was made to trust, once."""
        if not self.pending:
            return
        with _load_lock:
            if not self.pending:
                return
            if self.cafile is not None:
                self.load_verify_locations(self.cafile)
            else:
                self.load_default_certs(ssl.Purpose.SERVER_AUTH)
            self.pending = False

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self.load_deferred()
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self.load_deferred()
        return super().wrap_bio(*args, **kwargs)

    def get_ca_certs(self, binary_form: bool = False) -> list[Any]:
        self.load_deferred()
        return super().get_ca_certs(binary_form)

    def cert_store_stats(self) -> dict[str, int]:
        self.load_deferred()
        return super().cert_store_stats()


def create_default_context(
    purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH, *, cafile: Any = None, capath: Any = None, cadata: Any = None
) -> ssl.SSLContext:
    """``ssl.create_default_context`` with the same settings, reading a client's CA file (or the
    system's certificates) on first use. Anything else, and a CA file that is not there (so the
    error comes at once, as it would), goes to the original."""
    if purpose != ssl.Purpose.SERVER_AUTH or capath is not None or cadata is not None or (
        cafile is not None and not os.path.isfile(cafile)
    ):
        return _original_create_default_context(purpose, cafile=cafile, capath=capath, cadata=cadata)
    context = DeferredCAContext(ssl.PROTOCOL_TLS_CLIENT)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    context.cafile = os.fspath(cafile) if cafile is not None else None
    context.pending = True
    keylog = os.environ.get("SSLKEYLOGFILE")
    if keylog and hasattr(context, "keylog_filename") and not sys.flags.ignore_environment:
        context.keylog_filename = keylog
    return context


def install() -> None:
    """Make ``ssl.create_default_context`` defer reading certificates, in this process and its forks."""
    ssl.create_default_context = create_default_context
