"""The ETA a client reads: it counts the trainings ahead of a queued one, and it does not drop when
the training loop starts before the loop has measured its own step rate."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from prefect.client.schemas.objects import StateType

from api.gateway import TrainingRun
from api.queueview import QueueView, first_free_slot
from api.status import POST_TRAINING_S, compose_status, job_seconds
from flows.params import StageRecord, TrainingStatus
from flows.registry import BaseModelEntry

SECONDS_PER_STEP = 0.5


def a_run(name: str, state: StateType = StateType.SCHEDULED, created_s_ago: float = 0.0, steps: int = 100,
          running_for_s: float | None = None) -> TrainingRun:
    now = datetime.now(timezone.utc)
    return TrainingRun(
        training_id=name, flow_run_id=uuid.uuid4(), state=state, state_message=None,
        created=now - timedelta(seconds=created_s_ago), parameters={"max_train_steps": steps, "base_model_id": "m"},
        state_since=now - timedelta(seconds=running_for_s) if running_for_s is not None else None,
    )


def status_of(run: TrainingRun, stage: StageRecord | None, **kwargs: object) -> dict:
    return compose_status(run, stage, None, lambda key: key, SECONDS_PER_STEP, **kwargs).model_dump()


def test_the_first_free_slot_follows_the_queue_order() -> None:
    assert first_free_slot([], 1) == 0
    assert first_free_slot([30.0], 2) == 0  # a slot is free
    assert first_free_slot([30.0, 10.0], 1) == 40.0
    assert first_free_slot([30.0, 10.0, 5.0], 2) == 15.0  # 10 then 5 on one slot while 30 runs on the other


def test_training_start_keeps_counting_the_steps_left_until_a_rate_is_measured() -> None:
    run = a_run("t1", StateType.RUNNING)
    started = StageRecord(status=TrainingStatus.TRAINING_STARTED, stage="training", total_steps=1000,
                          log=["Training Started on 5 images"])
    halfway = started.model_copy(update={"step": 500, "steps_per_s": 2.0})
    at_start, later = status_of(run, started), status_of(run, halfway)
    assert at_start["eta_seconds"] == 1000 * SECONDS_PER_STEP + POST_TRAINING_S  # was POST_TRAINING_S (20 s) alone
    assert later["eta_seconds"] == 500 / 2.0 + POST_TRAINING_S
    assert at_start["eta_seconds"] > later["eta_seconds"]


def test_a_queued_status_adds_the_wait_and_says_how_many_are_ahead() -> None:
    from api.status import QueueWait

    alone = status_of(a_run("t2"), None)
    behind = status_of(a_run("t2"), None, wait=QueueWait(ahead=2, seconds=300.0))
    assert behind["eta_seconds"] == alone["eta_seconds"] + 300
    assert behind["data"].startswith("Deploying GPU, waiting for a worker; 2 trainings ahead in the queue, ETA : ")
    assert "ahead" not in alone["data"]


class FakeGateway:
    def __init__(self, runs: list[TrainingRun]) -> None:
        self.runs, self.reads = runs, 0

    async def active_trainings(self) -> list[TrainingRun]:
        self.reads += 1
        return list(self.runs)


def test_the_view_counts_only_runs_created_earlier_and_what_is_left_of_a_running_one() -> None:
    registry = {"m": BaseModelEntry.model_validate({"id": "m", "family": "sd15", "resolution": 512,
                                                    "source": {"kind": "builtin", "ref": "tiny"},
                                                    "seconds_per_step": SECONDS_PER_STEP})}
    running = a_run("run", StateType.RUNNING, created_s_ago=300, steps=100, running_for_s=20)
    queued = a_run("q1", created_s_ago=200, steps=200)
    me = a_run("me", created_s_ago=100)
    later = a_run("q2", created_s_ago=50, steps=400)
    gateway = FakeGateway([running, queued, me, later])
    view = QueueView(gateway, registry, gpu_slots=1)  # type: ignore[arg-type]

    async def ask() -> tuple:
        wait = await view.fresh_wait_for("me", me.created)
        again = await view.fresh_wait_for("me", me.created)  # the snapshot is fresh: no second read
        view.forget("q1")
        return wait, again, view.wait_for("me", me.created), view.wait_for("new", None)

    wait, again, after_cancel, newcomer = asyncio.run(ask())
    left_running = job_seconds(100, SECONDS_PER_STEP) - 20
    assert wait.ahead == 2 and wait.seconds == pytest.approx(left_running + job_seconds(200, SECONDS_PER_STEP), abs=1)
    assert again.ahead == wait.ahead and again.seconds == pytest.approx(wait.seconds, abs=1) and gateway.reads == 1
    assert after_cancel.ahead == 1 and after_cancel.seconds == pytest.approx(left_running, abs=1)
    assert newcomer.ahead == 3  # a training created now waits for every active one
