"""The cleanup flow: after a cancel or a delete, wait for the training run to end, then remove its files."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from prefect import flow
from pydantic import Field

from flows.params import TRAINING_ID_PATTERN
from tasks.cleanup import announce_cancelled, delete_artifacts, forget_training, wait_for_run_end
from tasks.context import flush_webhooks


@flow(name="dreamflow-cleanup")
def cleanup_training(
    training_id: Annotated[str, Field(min_length=4, max_length=32, pattern=TRAINING_ID_PATTERN)],
    flow_run_id: UUID | None = None,
    reason: Literal["cancelled", "deleted"] = "deleted",
    webhook: str | None = None,
) -> int:
    """Remove every stored artifact of a cancelled or deleted training (retried until done).

    Args:
        training_id: The training whose files are removed (everything under trainings/{training_id}/).
        flow_run_id: Its flow run; the cleanup waits until that run has ended. Empty: each flow run of
            the training (started from the UI, name only the training).
        reason: "deleted" also takes the training out of its owner's list, as a delete through the
            API does.
        webhook: The webhook to tell that the training was cancelled (its last status), if any: the
            API gives it for a cancel, and for a delete of a training that was still going.
    """
    wait_for_run_end(training_id, str(flow_run_id) if flow_run_id else None)
    if reason == "deleted":
        forget_training(training_id)
    removed = delete_artifacts(training_id)
    if webhook:
        announce_cancelled(training_id, webhook, "training cancelled by the owner" if reason == "cancelled"
                           else "training cancelled: the owner deleted it")
        flush_webhooks()
    return removed
