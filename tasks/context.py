"""What every task of the worker shares: settings, the store, the registry, work folders, stage reports."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from flows.params import StageRecord, TrainingStatus
from flows.records import read_stage, write_stage
from flows.registry import BaseModelEntry, load_registry, lookup
from flows.settings import STAGE_LOGGER, Settings, get_settings
from flows.store import ObjectStore, StorageError, store_from_settings
from tasks.webhooks import DeliveryPolicy, deliver, outbox, webhook_body


MAX_RUNS = 3  # a crashed training is rerun (resuming from its checkpoint) at most twice
HOLD_FOLDER = "test-stage-hold"
HOLD_LIMIT_S = 600.0
HOLD_POLL_S = 0.2
WEBHOOK_FLUSH_S = 30.0  # how long a run that ends waits for its last webhook deliveries

# The stage libraries log under "tasks.*"; where PREFECT_LOGGING_EXTRA_LOGGERS names it (dreamflow up,
# the image), Prefect sends their records to the run's log. Their INFO lines (a checkpoint stored, a
# resume, an export written) belong there too, not only warnings (the root logger's level).
if logging.getLogger(STAGE_LOGGER).level == logging.NOTSET:
    logging.getLogger(STAGE_LOGGER).setLevel(logging.INFO)


@lru_cache(maxsize=1)
def worker_settings() -> Settings:
    """The worker process's settings, read once on first use."""
    return get_settings()


@lru_cache(maxsize=1)
def worker_store() -> ObjectStore:
    """The artifact store of this worker process."""
    return store_from_settings(worker_settings())


def base_model(base_model_id: str) -> BaseModelEntry:
    """The registry entry of a base model."""
    return lookup(load_registry(worker_settings().registry_file), base_model_id)


def workdir(training_id: str, *parts: str) -> Path:
    """A local scratch folder of one training (created on demand)."""
    path = worker_settings().resolved_data_dir.joinpath("work", training_id, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_workdir(training_id: str) -> None:
    shutil.rmtree(worker_settings().resolved_data_dir / "work" / training_id, ignore_errors=True)


class TooManyCrashes(RuntimeError):
    """A training crashed (worker or process died) more often than it may be rerun."""


def check_run_count(training_id: str) -> int:
    """Log which attempt this is and return it; refuse to go on after ``MAX_RUNS`` crashed attempts."""
    from prefect.runtime import flow_run

    attempt = flow_run.run_count or 1
    run_logger().info("training %s, attempt %d", training_id, attempt)
    if attempt > MAX_RUNS:
        raise TooManyCrashes(f"the training crashed {attempt - 1} times (worker or process died); giving up")
    return attempt


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a run, a plain logger outside one (tests, scripts)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("dreamflow")


def report_stage(training_id: str, status: TrainingStatus, stage: str, message: str, **fields: object) -> None:
    """Publish a stage change (or progress inside a stage) for the facade and log it.

    A change of status is also posted to the training's webhook, when it has one. The status record
    is a view, not the work: a store that cannot be reached (say, an S3 server restarting) costs
    this report, logged, and never the training; the next report writes the record again.
    """
    store = worker_store()
    try:
        current = read_stage(store, training_id)
        updated = (current or StageRecord()).model_copy(update={"status": status, "stage": stage, **fields})
        write_stage(store, training_id, updated, line=message)
    except StorageError as exc:
        run_logger().warning("%s: %s (status record not written: %s)", stage, message, exc)
        return
    run_logger().info("%s: %s", stage, message)
    if updated.webhook and (current is None or current.status != status):
        notify_webhook(training_id, updated.webhook, status.value, message, updated.error)
    hold_at_stage(stage)


def hold_at_stage(stage: str) -> None:
    """Test only (``DREAMFLOW_TEST_STAGE_HOLD``, off by default): wait here while the file
    ``<data dir>/test-stage-hold/<stage>`` exists, at most ``HOLD_LIMIT_S``."""
    settings = worker_settings()
    if not settings.test_stage_hold:
        return
    marker = settings.resolved_data_dir / HOLD_FOLDER / stage
    deadline = time.monotonic() + HOLD_LIMIT_S
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(HOLD_POLL_S)


def notify_webhook(training_id: str, url: str, status: str, logs: str, error: str | None = None) -> None:
    """Queue one status change for a webhook and return at once; it is delivered in order on the
    process's outbox thread, retried with backoff (a slow or dead receiver never holds up the job)."""
    settings = worker_settings()
    policy = DeliveryPolicy(allow_private=settings.allow_private_networks)
    body = webhook_body(training_id, status, logs, error)
    logger = run_logger()  # the run's logger, taken here: the outbox thread has no run context

    def send() -> None:
        failure = deliver(url, body, settings.webhook_secret, policy)
        if failure is not None:
            logger.warning("webhook %s: status %s not delivered: %s", url, status, failure)

    outbox().post(send)


@contextmanager
def webhooks_delivered() -> Iterator[None]:
    """Around a run's body: its webhook deliveries are flushed when the body ends, however it ends."""
    try:
        yield
    finally:
        flush_webhooks()


def flush_webhooks() -> None:
    """Before a run ends: let its queued webhook deliveries finish, at most ``WEBHOOK_FLUSH_S``."""
    pending = outbox().flush(WEBHOOK_FLUSH_S)
    if pending:
        run_logger().warning("%d webhook deliveries still pending after %.0f s; they are dropped when the run's "
                             "process ends", pending, WEBHOOK_FLUSH_S)


def process_start_line() -> str:
    """How this flow-run process started: forked from the warm runner, or a cold Python start."""
    if os.environ.get("DREAMFLOW_WARM_START") == "1":
        ahead = "; Prefect's settings built ahead" if os.environ.get("DREAMFLOW_WARM_SETTINGS") == "ahead" else ""
        return f"warm start: forked from the warm runner (torch, diffusers and Prefect already imported{ahead})"
    return "cold start: a fresh Python process (imports torch, diffusers and Prefect itself)"
