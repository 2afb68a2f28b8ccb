"""The training flow: one run per training id, the stages of SPEC §3 as tasks."""

from __future__ import annotations

from prefect import Flow, flow, get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.states import State

from flows.params import TrainingParams, TrainingStatus
from tasks.artifacts import artifacts_in_background
from tasks.caption import caption_images
from tasks.context import check_run_count, flush_webhooks, process_start_line, report_stage, webhooks_delivered
from tasks.convert import convert_weights
from tasks.fetch import fetch_images
from tasks.preprocess import crop_faces
from tasks.registration import tag_own_run
from tasks.samples import make_samples
from tasks.storage import finish_if_published, publish_manifest, upload_artifacts
from tasks.train import train_model


def failure_reason(state: State) -> str:
    """The words a user can act on: the exception's own message where there is one."""
    try:
        outcome = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - the result may be unreadable; fall back to the state message
        outcome = None
    if isinstance(outcome, BaseException):
        return str(outcome) or type(outcome).__name__
    return state.message or "the training run failed"


def record_failure(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """Flow state hook: publish why the run failed."""
    params = flow_run.parameters.get("params") or {}
    training_id = params.get("training_id") if isinstance(params, dict) else params.training_id
    if training_id:
        reason = failure_reason(state)
        report_stage(training_id, TrainingStatus.FAILED, "failed", f"failed: {reason}", error=reason)
        flush_webhooks()


@flow(
    name="dreamflow-training",
    on_failure=[record_failure],  # a crash is not final: the crash-rerun automation reschedules it
    log_prints=False,
)
def run_training(params: TrainingParams) -> str:
    """Train a model from a handful of photos and publish it with its samples and manifest."""
    get_run_logger().info(process_start_line())
    attempt = check_run_count(params.training_id)
    with artifacts_in_background(), webhooks_delivered():  # both done before the run ends
        if attempt > 1 and finish_if_published(params.training_id):
            return params.training_id  # a rerun after the manifest was written: the published model stands
        tag_own_run(params)  # runs started from the UI or a schedule become visible to their owner
        raw = fetch_images(params)
        crops = crop_faces(params, raw)
        captions = caption_images(params, crops)
        trained = train_model(params, crops, captions)
        # The weights are converted and stored (CPU and network: seconds for a DreamBooth checkpoint)
        # while the samples render. The samples stay on this thread: torch's CPU kernels (OpenMP) run
        # 1.7x slower on another. Statuses stay in order: deploying_model once the model files are stored.
        converting = convert_weights.submit(params, trained)
        storing = upload_artifacts.submit(params.training_id, converting, "export", announce=True)
        samples = make_samples(params, trained)
        converting.result()  # a failed conversion fails the run with its own error, not its upload's
        stored = storing.result()
        report_stage(params.training_id, TrainingStatus.DEPLOYING_MODEL, "publishing",
                     "sample images generated; storing them and publishing the model")
        stored_samples = upload_artifacts(params.training_id, samples, "samples")
        return publish_manifest(params, trained, stored, stored_samples)
