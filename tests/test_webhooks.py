"""Webhook delivery runs beside the pipeline: a slow or hanging receiver holds up neither the
training nor the GPU slot, and the deliveries still arrive in the order of the status changes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from gatedreceiver import GatedReceiver, gated_receiver

from tasks.webhooks import DeliveryPolicy, Outbox, deliver, webhook_body


@pytest.fixture
def receiver() -> Iterator[GatedReceiver]:
    with gated_receiver() as running:
        yield running


def test_posting_returns_while_the_receiver_still_holds_the_first_delivery(receiver: GatedReceiver) -> None:
    url = receiver.url
    policy = DeliveryPolicy(allow_private=True, timeout_s=30)
    outbox, failures = Outbox(), []
    statuses = ["deploying_gpu", "training_started", "training_success", "model_ready"]
    for status in statuses:
        body = webhook_body("abcd1234", status, "log line")
        outbox.post(lambda body=body: failures.append(deliver(url, body, None, policy)))
    # every post has returned; the receiver has the first delivery and has not answered it
    deadline = time.monotonic() + 10
    while not receiver.arrived and time.monotonic() < deadline:
        time.sleep(0.01)
    assert receiver.arrived == ["deploying_gpu"]
    assert outbox.flush(0.2) == 4  # the run would wait for them at its end, within a bound

    receiver.gate.set()
    assert outbox.flush(30) == 0
    assert receiver.arrived == statuses and failures == [None] * 4


def test_a_delivery_that_raises_does_not_stop_the_ones_after_it() -> None:
    outbox, done = Outbox(), []

    def broken() -> None:
        raise RuntimeError("receiver went away")

    outbox.post(broken)
    outbox.post(lambda: done.append("next"))
    assert outbox.flush(10) == 0 and done == ["next"]


def test_the_outbox_thread_ends_when_idle_and_a_later_post_starts_another() -> None:
    outbox, done = Outbox(), []
    outbox.IDLE_S = 0.05
    outbox.post(lambda: done.append(1))
    assert outbox.flush(10) == 0
    deadline = time.monotonic() + 5
    while outbox._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outbox._thread is None
    outbox.post(lambda: done.append(2))
    assert outbox.flush(10) == 0 and done == [1, 2]
