"""prefect.yaml is the one list of deployments; each is deployed with a typed, described form, and
a run started from that form (not through the facade) belongs to its owner like a REST-started one.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow, Task, flow, get_client, task
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_LOGGING_TO_API_ENABLED,
    temporary_settings,
)
from prefect.states import State
from prefectruns import read_deployment, read_flow_run, start_deployment, wait_for_final
from stackserver import KEYS, RunningStack, prefect_request

from pydantic import ValidationError

from flows.params import TRAINING_ID_PATTERN, TrainingParams
from flows.records import Manifest, write_manifest
from flows.settings import hash_key
from tasks import registration
from tasks.registration import stage_seconds, tag_own_run, timed_stage
from tasks.sample_photos import write_sample_photos

PROJECT = Path(__file__).resolve().parent.parent
SPEC_DEPLOYMENTS = {"lora", "dreambooth", "sandbox", "cleanup", "retrain"}
TYPE_KEYS = {"type", "anyOf", "allOf", "oneOf", "enum", "$ref", "const"}


def deployments() -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in yaml.safe_load((PROJECT / "prefect.yaml").read_text())["deployments"]}


def entrypoint_flow(entrypoint: str) -> Flow:
    """The flow a module-path entrypoint (``package.module.function``) names."""
    module, _, name = entrypoint.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_prefect_yaml_lists_every_deployment_with_an_existing_flow() -> None:
    listed = deployments()
    assert SPEC_DEPLOYMENTS <= set(listed)
    pools = {d["work_pool"]["name"] for d in listed.values()}
    assert pools == {"{{ $DREAMFLOW_WORK_POOL }}"}
    config = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    assert config["pull"] == [], "a pull step costs every run a websocket event; the pool names the folder"
    for name, deployment in listed.items():
        assert ":" not in deployment["entrypoint"], f"{name}: a file path entrypoint runs the flow's module again"
        assert isinstance(entrypoint_flow(deployment["entrypoint"]), Flow), name
        assert deployment.get("description"), name
    assert [s["cron"] for s in listed["retrain"]["schedules"]] == ["0 3 * * *"]


def test_cleanups_and_recoveries_are_handed_out_before_queued_trainings(stack: RunningStack) -> None:
    """Prefect gives a worker the runs of the pool's queues in priority order (lower first): the
    cleanup and recovery deployments' queue is ahead of the trainings' "default" queue."""
    queues = {q["name"]: q["priority"] for q in prefect_request(
        "POST", f"{stack.settings.prefect_api}/work_pools/{stack.settings.work_pool}/queues/filter", {}).json()}
    assert queues["maintenance"] < queues["default"], queues
    api = stack.settings.prefect_api
    assert read_deployment(api, "dreamflow-cleanup/cleanup").work_queue_name == "maintenance"
    assert read_deployment(api, "dreamflow-crash-recovery/recover-crashed").work_queue_name == "maintenance"
    for training in ("lora", "dreambooth", "sandbox"):
        assert read_deployment(api, f"dreamflow-training/{training}").work_queue_name == "default", training


def test_the_embedded_process_pool_starts_runs_in_the_checkout() -> None:
    from deployments.pool import job_template

    assert job_template(None)["variables"]["properties"]["working_dir"]["default"] == str(PROJECT)


def test_crash_recovery_replaces_older_rerun_automations_with_one_that_starts_the_recovery(stack: RunningStack) -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState, RunDeployment

    from deployments.pool import (
        RECOVERY_DEPLOYMENT,
        RERUN_AUTOMATION,
        prepare_crash_recovery,
        rerun_crashed_trainings,
    )

    async def add_old_one() -> None:  # what dreamflow created before: reschedule straight away
        async with get_client() as client:
            recovery = await client.read_deployment_by_name(RECOVERY_DEPLOYMENT)
            old = rerun_crashed_trainings(recovery.id)
            old.actions = [ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry", force=True)]
            await client.create_automation(old)

    async def read() -> tuple[list, object]:
        async with get_client() as client:
            recovery = await client.read_deployment_by_name(RECOVERY_DEPLOYMENT)
            return await client.read_automations_by_name(RERUN_AUTOMATION), recovery.id

    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api}):
        asyncio.run(add_old_one())
        assert len(asyncio.run(read())[0]) == 2
        prepare_crash_recovery(stack.settings.prefect_api)
        automations, recovery_id = asyncio.run(read())
    assert len(automations) == 1
    (action,) = automations[0].actions
    assert isinstance(action, RunDeployment) and action.deployment_id == recovery_id


def test_retrain_schedule_parameters_are_valid() -> None:
    from flows.retrain import RetrainParams

    params = RetrainParams.model_validate(deployments()["retrain"]["parameters"]["params"])
    assert params.dataset_prefix == f"datasets/{params.model_name}/"


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a ``$ref`` (or a one-element allOf around one) into ``definitions``/``$defs``."""
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node, **node["allOf"][0]}
    ref = node.get("$ref")
    if not ref:
        return node
    section, _, name = ref.removeprefix("#/").partition("/")
    return schema[section][name]


def undescribed_fields(schema: dict[str, Any]) -> list[str]:
    """Every parameter, and every field of a parameter model, that lacks a type or a description."""
    problems = []
    for name, prop in schema["properties"].items():
        target = resolve(schema, prop)
        fields = target.get("properties") if target.get("type") == "object" or "properties" in target else None
        for field_name, field in (fields or {name: prop}).items():
            label = f"{name}.{field_name}" if fields else name
            if not TYPE_KEYS & set(field):
                problems.append(f"{label}: no type")
            if not field.get("description"):
                problems.append(f"{label}: no description")
    return problems


@pytest.mark.parametrize("name", ["lora", "dreambooth", "sandbox", "cleanup", "retrain"])
def test_deployed_parameter_forms_are_typed_and_described(stack: RunningStack, name: str) -> None:
    flow_name = entrypoint_flow(deployments()[name]["entrypoint"]).name
    deployed = read_deployment(stack.settings.prefect_api, f"{flow_name}/{name}")
    schema = deployed.parameter_openapi_schema
    assert schema and schema["properties"], f"{name} has no parameter schema"
    assert undescribed_fields(schema) == []
    # The UI renders descriptions as HTML: "models/<name>/" would show as "models//".
    shown = json.dumps(schema) + (deployed.description or "")
    assert re.findall(r"<[A-Za-z_]+>", shown) == [], name


def test_the_dreambooth_form_starts_as_a_dreambooth_training(stack: RunningStack) -> None:
    deployed = read_deployment(stack.settings.prefect_api, "dreamflow-training/dreambooth")
    assert deployed.parameters["params"]["method"] == "dreambooth"
    assert "method" not in read_deployment(stack.settings.prefect_api, "dreamflow-training/lora").parameters.get("params", {})


def test_a_schedule_turned_on_in_the_ui_stays_on_when_dreamflow_up_deploys_again(stack: RunningStack) -> None:
    """`dreamflow up` runs `prefect deploy --all` at every start, which applies prefect.yaml's
    `active: false` again: the daily retraining went off at each restart."""
    from deployments.stack import _prepare_pool_and_deployments, bin_path

    api = stack.settings.prefect_api
    retrain = read_deployment(api, "dreamflow-retrain/retrain")
    assert [s.active for s in retrain.schedules] == [False]  # as prefect.yaml ships it

    async def turn_on() -> None:
        async with PrefectClient(api) as client:
            await client.update_deployment_schedule(retrain.id, retrain.schedules[0].id, active=True)

    asyncio.run(turn_on())
    try:
        _prepare_pool_and_deployments(stack.stack, bin_path("prefect"))  # what the next `dreamflow up` does
        again = read_deployment(api, "dreamflow-retrain/retrain")
        assert [s.active for s in again.schedules] == [True]
    finally:
        schedules = read_deployment(api, "dreamflow-retrain/retrain").schedules

        async def turn_off() -> None:
            async with PrefectClient(api) as client:
                for schedule in schedules:
                    await client.update_deployment_schedule(retrain.id, schedule.id, active=False)

        asyncio.run(turn_off())


def ui_params(stack: RunningStack, tmp_path: Path, owner_key: str) -> TrainingParams:
    """The form a person fills in: an uploaded photo, the owner set to an API key's hash."""
    photo = write_sample_photos(tmp_path, count=1)[0]
    upload_key = f"uploads/ui-{uuid.uuid4().hex[:8]}/{photo.name}"
    stack.store.put_file(upload_key, photo)
    return TrainingParams(
        training_id=f"ui{uuid.uuid4().hex[:10]}", owner=hash_key(owner_key), instance_prompt="photo of sks thing",
        images=[f"store:{upload_key}"], max_train_steps=5, sample_count=1,
    )


def listed_ids(stack: RunningStack, key: str) -> list[str]:
    with stack.client() as client:
        return client.post("/api/v3/finetune_list", json={"key": key}).json()["data"]


def test_a_run_started_from_the_ui_form_belongs_to_its_owner(stack: RunningStack, tmp_path: Path) -> None:
    params = ui_params(stack, tmp_path, KEYS[0])
    run_id = start_deployment(stack.settings.prefect_api, "dreamflow-training/lora",
                              {"params": params.model_dump(mode="json")})
    deadline = time.monotonic() + 300
    while params.training_id not in listed_ids(stack, KEYS[0]):
        run = read_flow_run(stack.settings.prefect_api, run_id)
        assert run.state is None or not run.state.is_final(), (
            f"run {run.name} ended {run.state.type.value if run.state else None} without appearing in its "
            f"owner's finetune_list; its tags: {run.tags}")
        assert time.monotonic() < deadline
        time.sleep(0.5)
    status, _ = stack.wait_until_done(params.training_id, KEYS[0])
    assert status["training_status"] == "model_ready", status
    assert params.training_id not in listed_ids(stack, KEYS[1])
    wait_for_final(stack.settings.prefect_api, run_id)


def test_tag_own_run_makes_a_run_the_facade_can_find(stack: RunningStack) -> None:
    """tag_own_run in a flow run the facade did not start: tags and name as the facade's own runs."""
    params = TrainingParams(training_id=f"tag{uuid.uuid4().hex[:10]}", owner=hash_key(KEYS[1]),
                            instance_prompt="photo of sks thing", images=["store:uploads/none.png"])

    @flow(name="dreamflow-registration-check")
    def registered(params: TrainingParams) -> list[str]:
        return tag_own_run(params)

    # this process's run logs stay local, so none are still being shipped when the stack stops
    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api, PREFECT_LOGGING_TO_API_ENABLED: False}):
        tags = registered(params)
    assert {"dreamflow", f"training:{params.training_id}", f"owner:{hash_key(KEYS[1])}"} <= set(tags)
    assert params.training_id in listed_ids(stack, KEYS[1])
    assert params.training_id not in listed_ids(stack, KEYS[0])


def register_elsewhere(stack: RunningStack, params: TrainingParams) -> State:
    """tag_own_run in a flow run started outside the facade (as from the UI); the run's final state."""

    @flow(name="dreamflow-registration-check")
    def registered(params: TrainingParams) -> list[str]:
        return tag_own_run(params)

    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api, PREFECT_LOGGING_TO_API_ENABLED: False}):
        return registered(params, return_state=True)


def register_attempts(stack: RunningStack, state: State) -> list[int]:
    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api}), get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return [run.run_count for run in runs if run.name.startswith("register-run")]


def test_a_run_outside_the_facade_is_refused_what_the_facade_would_refuse(
    stack: RunningStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UI run may not take over another owner's training id (it would overwrite that owner's model),
    an id with a finished model, or go past the deployment's limits; each refusal is said in words,
    at once (not retried), before any image is fetched."""
    monkeypatch.setattr(registration, "worker_store", lambda: stack.store)  # the stack's store, not this process's
    first = TrainingParams(training_id=f"claim{uuid.uuid4().hex[:10]}", owner=hash_key(KEYS[1]),
                           instance_prompt="photo of sks thing", images=["store:uploads/none.png"])
    assert register_elsewhere(stack, first).is_completed()
    assert register_elsewhere(stack, first).is_completed()  # its owner may try again under the same id
    other = {"training_id": f"claim{uuid.uuid4().hex[:10]}"}
    refusals = {
        "another owner": (first.model_copy(update={"owner": hash_key(KEYS[0])}),
                          f"training id {first.training_id!r} belongs to another owner's training"),
        "steps": (first.model_copy(update={**other, "max_train_steps": 4001}),
                  "max_train_steps 4001 is over this deployment's limit of 4000"),
        "images": (first.model_copy(update={**other, "images": ["store:uploads/none.png"] * 31}),
                   "31 images; at most 30 per training"),
        "base model": (first.model_copy(update={**other, "base_model_id": "sd-9"}), "unknown base model 'sd-9'; known: "),
    }
    for case, (params, words) in refusals.items():
        state = register_elsewhere(stack, params)
        assert state.is_failed(), case
        assert words in str(state.result(raise_on_failure=False)), case
        assert register_attempts(stack, state) == [1], case  # a refusal is not retried

    write_manifest(stack.store, Manifest(training_id=first.training_id, owner=first.owner, method="lora",
                                         base_model_id="tiny", family="sd15", instance_prompt="photo of sks thing"))
    finished = register_elsewhere(stack, first)
    assert "already has a finished model; delete it first" in str(finished.result(raise_on_failure=False))


@pytest.mark.parametrize("training_id", ["../../../escape", "a/b/c", "ab cd", "-lead", "x" * 33, "abc"])
def test_training_ids_that_would_name_other_folders_are_refused_by_the_form(stack: RunningStack, training_id: str) -> None:
    deployed = read_deployment(stack.settings.prefect_api, "dreamflow-training/lora")
    schema = deployed.parameter_openapi_schema
    field = resolve(schema, schema["properties"]["params"])["properties"]["training_id"]
    assert field["pattern"] == TRAINING_ID_PATTERN  # the UI's form checks it before a run is created
    with pytest.raises(ValidationError, match="training_id"):
        TrainingParams(training_id=training_id, instance_prompt="photo of sks thing", images=["https://e.com/a.jpg"])


def test_the_cleanup_form_deletes_a_training_named_by_its_id_alone(stack: RunningStack) -> None:
    """Run from the UI with only a training id (its flow run unknown, or given as a run Prefect does
    not have), the cleanup removes the training's files and takes it out of its owner's list."""
    trainings = []
    for _ in range(2):
        params = TrainingParams(training_id=f"gone{uuid.uuid4().hex[:10]}", owner=hash_key(KEYS[1]),
                                instance_prompt="photo of sks thing", images=["store:uploads/none.png"])
        assert register_elsewhere(stack, params).is_completed()
        stack.store.put_bytes(f"trainings/{params.training_id}/exports/lora.safetensors", b"weights")
        trainings.append(params.training_id)
    assert set(trainings) <= set(listed_ids(stack, KEYS[1]))
    forms = [{"training_id": trainings[0]}, {"training_id": trainings[1], "flow_run_id": str(uuid.uuid4())}]
    runs = [start_deployment(stack.settings.prefect_api, "dreamflow-cleanup/cleanup", form) for form in forms]
    for run_id in runs:
        assert wait_for_final(stack.settings.prefect_api, run_id).state.is_completed()
    for training_id in trainings:
        assert stack.store.list(f"trainings/{training_id}/") == []
        assert training_id not in listed_ids(stack, KEYS[1])
    with pytest.raises(Exception, match="does not match"):  # the form's schema refuses it: no run starts
        start_deployment(stack.settings.prefect_api, "dreamflow-cleanup/cleanup", {"training_id": "../../etc"})
    # Prefect's schema check leaves formats alone: a run id that is no UUID fails the run, in words
    bad = start_deployment(stack.settings.prefect_api, "dreamflow-cleanup/cleanup",
                           {"training_id": trainings[0], "flow_run_id": "not-a-run-id"})
    state = wait_for_final(stack.settings.prefect_api, bad).state
    assert state.is_failed() and "flow_run_id" in state.message, state.message


def test_a_run_started_with_the_facades_tags_registers_without_an_api_call(
    stack: RunningStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The facade's runs carry their tags and name from the start: registering them reads nothing."""
    from prefect import tags as prefect_tags

    from tasks import registration

    params = TrainingParams(training_id=f"tag{uuid.uuid4().hex[:10]}", owner=hash_key(KEYS[1]),
                            instance_prompt="photo of sks thing", images=["store:uploads/none.png"])
    calls: list[bool] = []
    original = registration.get_client

    def counting_client(*args: Any, **kwargs: Any) -> Any:
        calls.append(True)
        return original(*args, **kwargs)

    @flow(name="dreamflow-registration-check", flow_run_name=params.training_id)
    def registered(params: TrainingParams) -> list[str]:
        return tag_own_run(params)

    monkeypatch.setattr(registration, "get_client", counting_client)  # dreamflow's calls, not the engine's
    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api, PREFECT_LOGGING_TO_API_ENABLED: False}):
        with prefect_tags(*registration.run_tags(params)):
            tags = registered(params)
    assert set(registration.run_tags(params)) <= set(tags)
    assert calls == []
    assert params.training_id in listed_ids(stack, KEYS[1])


def sleeping_stage(name: str, seconds: float) -> Task:
    """A timed stage (a task named ``name``) that sleeps ``seconds``."""

    @task(name=name)
    @timed_stage
    def stage() -> None:
        time.sleep(seconds)

    return stage


@task(name="read-stages")
def read() -> dict[str, float]:
    """The flow run's stage seconds, read from inside a task as the manifest's stage does."""
    return stage_seconds()


def test_the_manifest_stage_seconds_include_the_stage_that_just_ended(stack: RunningStack) -> None:
    """Prefect's API hears that a task run ended from its events, a moment later; the stages a run
    timed itself are in its stage seconds at once (the samples' seconds were missing so)."""

    slow, quick = sleeping_stage("slow-stage", 0.3), sleeping_stage("quick-stage", 0.05)

    @flow(name="dreamflow-stage-seconds-check")
    def staged() -> dict[str, float]:
        slow()
        quick()
        quick()  # a second task run of one stage adds up
        return read()

    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api, PREFECT_LOGGING_TO_API_ENABLED: False}):
        seconds = staged()
    assert set(seconds) == {"slow-stage", "quick-stage"}  # read-stages is still running
    assert 0.3 <= seconds["slow-stage"] < 5 and 0.1 <= seconds["quick-stage"] < 5


def test_a_rerun_adds_the_stage_seconds_of_the_attempt_before_it(stack: RunningStack) -> None:
    """A first attempt times every stage itself; a later one (after a crash, in a new process) reads
    the earlier attempt's stages back from Prefect."""
    from tasks import registration

    early, late = sleeping_stage("early-stage", 0.2), sleeping_stage("late-stage", 0.05)

    @flow(name="dreamflow-stage-seconds-rerun", retries=1, retry_delay_seconds=0)
    def rerun() -> list[dict[str, float]]:
        from prefect.runtime import flow_run

        if flow_run.run_count == 1:
            early()
            raise RuntimeError("the first attempt dies after its first stage")
        registration._stage_times.clear()  # what a new process knows of the attempt before
        late()
        seen = [read()]
        deadline = time.monotonic() + 10  # Prefect records early-stage's end from its events
        while "early-stage" not in seen[-1] and time.monotonic() < deadline:
            time.sleep(0.2)
            seen.append(read())
        return seen

    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api, PREFECT_LOGGING_TO_API_ENABLED: False}):
        seconds = rerun()[-1]
    assert set(seconds) == {"early-stage", "late-stage"}
    assert 0.2 <= seconds["early-stage"] < 5 and 0.05 <= seconds["late-stage"] < 5
