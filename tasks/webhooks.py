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
import time
import uuid
from dataclasses import dataclass

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
