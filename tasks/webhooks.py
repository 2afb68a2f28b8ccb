"""Webhook delivery: the original's body shape, retries with backoff, Standard Webhooks signatures.

Plain module (no Prefect import). Signing follows the Standard Webhooks scheme: the signed content
is ``"{webhook-id}.{webhook-timestamp}.{body}"``, the signature ``v1,<base64 HMAC-SHA256>``, and a
secret written ``whsec_<base64>`` is used as its decoded bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import httpx

from flows.netguard import AddressRefused, check_public_url

log = logging.getLogger("dreamflow.webhooks")


@dataclass(frozen=True)
class DeliveryPolicy:
    """How hard to try one delivery."""

    attempts: int = 4
    backoff_s: float = 0.5  # doubles after each failed attempt
    timeout_s: float = 5.0
    allow_private: bool = False


def webhook_body(training_id: str, status: str, logs: str, error: str | None = None) -> dict[str, str]:
    """The body the original service posts; ``status`` is ``error`` with the reason on failure."""
    body = {"status": "error" if error else "success", "training_status": status, "logs": logs,
            "model_id": training_id}
    if error:
        body["error"] = error
    return body


def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()


def sign(secret: str, message_id: str, timestamp: int, payload: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    content = f"{message_id}.{timestamp}.".encode() + payload
    digest = hmac.new(secret_bytes(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str | None, message_id: str, payload: bytes) -> dict[str, str]:
    timestamp = int(time.time())
    headers = {"content-type": "application/json", "webhook-id": message_id, "webhook-timestamp": str(timestamp)}
    if secret:
        headers["webhook-signature"] = sign(secret, message_id, timestamp, payload)
    return headers


def deliver(url: str, body: dict[str, str], secret: str | None, policy: DeliveryPolicy) -> str | None:
    """POST ``body`` to ``url`` until a 2xx answer or the attempts run out; None when delivered, else
    why not (the address refused, or the last attempt's failure after all of them).

    The same ``webhook-id`` is sent on every attempt so receivers can drop duplicates.
    """
    if not policy.allow_private:
        try:
            check_public_url(url)
        except AddressRefused as exc:
            return f"refused without an attempt: {exc}"
    payload = json.dumps(body, separators=(",", ":")).encode()
    message_id = f"msg_{uuid.uuid4().hex}"
    delay, failure = policy.backoff_s, "no attempt made"
    for attempt in range(1, policy.attempts + 1):
        try:
            response = httpx.post(url, content=payload, headers=signed_headers(secret, message_id, payload),
                                  timeout=policy.timeout_s, follow_redirects=False)
            if 200 <= response.status_code < 300:
                return None
            failure = f"answered {response.status_code}"
        except httpx.HTTPError as exc:
            failure = f"failed: {exc}"
        log.warning("webhook %s %s (attempt %d)", url, failure, attempt)
        if attempt < policy.attempts:
            time.sleep(delay)
            delay *= 2
    return f"{policy.attempts} attempts, the last {failure}"


class Outbox:
    """A process's webhook deliveries, made one after another in the order they were posted, on a
    background thread: a receiver that is slow or down (each delivery may take its attempts and
    timeouts, about 24 s) delays neither the training nor the GPU slot it holds, nor the trainings of
    other owners waiting for that slot.

    The thread is a daemon and ends when idle; a run calls :meth:`flush` before it ends, so its
    last statuses are delivered (and their failures logged) while it still runs, within a bound.
    """

    IDLE_S = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self._thread: threading.Thread | None = None

    def post(self, job: Callable[[], None]) -> None:
        """Queue one delivery; returns at once."""
        with self._lock:
            self._jobs.put(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="webhook-outbox", daemon=True)
                self._thread.start()

    def flush(self, timeout_s: float) -> int:
        """Wait until every posted delivery is done, at most ``timeout_s``; the count still pending."""
        deadline = time.monotonic() + timeout_s
        with self._jobs.all_tasks_done:
            while self._jobs.unfinished_tasks and time.monotonic() < deadline:
                self._jobs.all_tasks_done.wait(max(0.0, deadline - time.monotonic()))
            return self._jobs.unfinished_tasks

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            try:
                job()
            except Exception:  # noqa: BLE001 - one broken delivery must not stop the others
                log.exception("webhook delivery failed")
            finally:
                self._jobs.task_done()


_outbox: Outbox | None = None


def outbox() -> Outbox:
    """This process's outbox (a forked process starts with an empty one)."""
    global _outbox
    if _outbox is None:
        _outbox = Outbox()
    return _outbox


def _forget_outbox() -> None:
    global _outbox
    _outbox = None


os.register_at_fork(after_in_child=_forget_outbox)
