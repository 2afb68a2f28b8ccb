"""The cleanup flow: after a cancel or a delete, wait for the training run to end, then remove its files."""

from __future__ import annotations

from typing import Literal

from prefect import flow

from tasks.cleanup import announce_cancelled, delete_artifacts, wait_for_run_end


@flow(name="dreamflow-cleanup")
def cleanup_training(
    training_id: str, flow_run_id: str, reason: Literal["cancelled", "deleted"] = "deleted", webhook: str | None = None
) -> int:
    """Remove every stored artifact of a cancelled or deleted training (retried until done).

    Args:
        training_id: The training whose files are removed (everything under trainings/{training_id}/).
        flow_run_id: Its flow run; the cleanup waits until that run has ended.
        reason: "cancelled" also tells the training's webhook; "deleted" does not.
        webhook: The training's webhook URL, if it had one.
    """
    wait_for_run_end(flow_run_id)
    removed = delete_artifacts(training_id)
    if reason == "cancelled":
        announce_cancelled(training_id, webhook)
    return removed
