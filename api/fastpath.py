"""A pure-ASGI fast path for the status routes: cached answers without FastAPI's per-request work.

Clients poll ``fine_tune_status`` far more often than they call anything else, and almost every
poll is answered from memory (the gateway's cached flow run, the status cache's serialized body).
Routing, dependency resolution and response models cost several times more than that answer, so
this middleware answers those polls itself:

- a POST to ``/api/v3/fine_tune_status/<id>`` or ``/api/sandbox/v3/fine_tune_status/<id>`` with a
  small JSON (or empty) body;
- the key is read and checked by the same functions as the routes' ``current_owner``; a missing or
  unknown key is the same 401;
- the gateway holds a fresh answer for (id, owner) and the status cache a fresh body composed from
  that answer's state (a body past half its age is served while a new one is composed).

Everything else (forms, bad JSON, unknown or others' ids, a cold or expired cache, other routes)
goes to FastAPI unchanged, with the body it already read handed on. The answers are the routes'
own bytes: the same body, status code and headers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from api.deps import FORM_TYPES, owner_of, presented_key
from api.errors import INVALID_KEY, error_response
from api.gateway import PrefectGateway
from api.statuscache import StatusCache
from flows.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATUS_PATH = re.compile(r"/api(?:/sandbox)?/v3/fine_tune_status/([^/]+)")
MAX_FAST_BODY = 16 * 1024  # a status poll is a key; larger bodies take the ordinary route


@dataclass
class FastPathCounts:
    """How many status requests the fast path answered and how many it handed to FastAPI."""

    answered: int = 0
    handed_on: int = 0


async def read_small_body(receive: Receive) -> tuple[list[Message], bytes | None]:
    """The messages received and the whole body, or None when it is larger than
    :data:`MAX_FAST_BODY` or the client left (the messages are then handed on as they came)."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FAST_BODY:
            return messages, None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return messages, b"".join(chunks)


def replaying(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives back ``messages`` first, then what the client sends next."""
    queued = list(messages)

    async def replay() -> Message:
        return queued.pop(0) if queued else await receive()

    return replay


def header(scope: Scope, name: bytes) -> str:
    """The first value of a request header, as Starlette decodes it ("" when absent)."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def json_object(raw: bytes) -> dict[str, Any] | None:
    """The body as the routes read a JSON one (empty is ``{}``); None where they would answer 400."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


class StatusFastPath:
    """ASGI middleware answering cached status polls; see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._invalid_key = error_response(401, INVALID_KEY).body
        self._key_hashes: tuple[Settings, frozenset[str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = STATUS_PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if match is None or scope["method"] != "POST" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        messages, raw = await read_small_body(receive)
        answer = self._answer(scope, match.group(1), raw) if raw is not None else None
        counts: FastPathCounts | None = getattr(scope["app"].state, "status_fast_path", None)
        if answer is None:
            if counts is not None:
                counts.handed_on += 1
            await self.app(scope, replaying(messages, receive), send)
            return
        if counts is not None:
            counts.answered += 1
        status, body = answer
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    def _answer(self, scope: Scope, training_id: str, raw: bytes) -> tuple[int, bytes] | None:
        """(status code, body) for a request the fast path can answer, else None."""
        state = scope["app"].state
        settings: Settings | None = getattr(state, "settings", None)
        gateway: PrefectGateway | None = getattr(state, "gateway", None)
        cache: StatusCache | None = getattr(state, "status_cache", None)
        if settings is None or gateway is None or cache is None:
            return None  # not started yet
        if header(scope, b"content-type").startswith(FORM_TYPES):
            return None
        body = json_object(raw)
        if body is None:
            return None
        owner = owner_of(presented_key(body, header(scope, b"authorization")), self._accepted(settings))
        if owner is None:
            return 401, self._invalid_key
        run = gateway.cached_training(training_id, owner)
        cached = cache.answer(training_id, owner, run) if run is not None else None
        return (200, cached) if cached is not None else None

    def _accepted(self, settings: Settings) -> frozenset[str]:
        """The accepted key hashes, computed once per settings object."""
        if self._key_hashes is None or self._key_hashes[0] is not settings:
            self._key_hashes = (settings, settings.api_key_hashes)
        return self._key_hashes[1]
