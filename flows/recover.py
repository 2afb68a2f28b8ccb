"""The crash-recovery flow: a crashed training goes back to the queue, a few times at most.

Prefect marks a training Crashed when its worker or process died. The automation
``dreamflow: rerun crashed trainings`` (deployments/pool.py) starts this flow for each such
crash. It counts the run's attempts in its state history, so the bound holds even for a process
that dies before the flow begins (a broken install, a worker that cannot start the run): the
training's own attempt check never runs there, and rescheduling it straight from the automation
went round every second, for ever.
"""

from __future__ import annotations

from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.states import Failed, Scheduled

from flows.params import TrainingStatus
from flows.records import is_deleted
from tasks.context import MAX_RUNS, flush_webhooks, report_stage

RUN_RESOURCE_PREFIX = "prefect.flow-run."
RERUN_STATE_NAME = "AwaitingRetry"


def crashed_run_id(crashed: str) -> UUID:
    """The flow run id of an event's resource id (``prefect.flow-run.<id>``) or of a bare id."""
    return UUID(crashed.removeprefix(RUN_RESOURCE_PREFIX))


def attempts(history: list[StateType]) -> int:
    """How often a worker took the run: each entry into Pending (Pending, then Submitting, is one).

    Every attempt of a run that needs recovery ended in a crash. Counting Crashed states instead
    would count one attempt twice when the worker reports a crash the runner reported already.
    """
    return sum(kind == StateType.PENDING and (index == 0 or history[index - 1] != StateType.PENDING)
               for index, kind in enumerate(history))


@flow(name="dreamflow-crash-recovery")
def recover_crashed_training(crashed: str) -> str:
    """Put a crashed training back in the queue (it resumes from its last checkpoint), or fail it
    after its third crash. A run that is no longer Crashed (cancelled, deleted, rerun) is left alone.

    Args:
        crashed: The crashed flow run: its id, or the resource id of its Crashed event.
    """
    logger = get_run_logger()
    run_id = crashed_run_id(crashed)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        if run.state is None or run.state.type != StateType.CRASHED:
            logger.info("flow run %s is %s now, not crashed: nothing to do", run_id, run.state and run.state.name)
            return "left alone"
        if is_deleted(run.tags):
            logger.info("flow run %s crashed, but its owner deleted the training: not rerun", run_id)
            return "left alone"
        crashed_attempts = attempts([state.type for state in client.read_flow_run_states(run_id)])
        if crashed_attempts < MAX_RUNS:
            client.set_flow_run_state(run_id, Scheduled(
                name=RERUN_STATE_NAME,
                message=f"rerun after crash {crashed_attempts} of at most {MAX_RUNS - 1}; "
                        "training resumes from its last checkpoint",
            ), force=True)
            logger.info("flow run %s crashed (%d of %d allowed): queued again", run_id, crashed_attempts, MAX_RUNS - 1)
            return "rerun"
        reason = f"the training crashed {crashed_attempts} times (its worker or process died); giving up"
        client.set_flow_run_state(run_id, Failed(message=reason), force=True)
    params = (run.parameters or {}).get("params") or {}
    if isinstance(params, dict) and params.get("training_id"):
        webhook = {"webhook": params["webhook"]} if params.get("webhook") else {}  # else keep the record's
        report_stage(params["training_id"], TrainingStatus.FAILED, "failed", f"failed: {reason}", error=reason,
                     **webhook)
        flush_webhooks()
    logger.warning("flow run %s: %s", run_id, reason)
    return "failed"
