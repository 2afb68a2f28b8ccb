"""What a person sees in the Prefect UI: the crop report, and for a finished model its summary,
sample grid and loss curve. Artifacts are views on records already stored with the training, so
failing to create one is logged and never fails a task.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from uuid import UUID

from prefect.artifacts import (
    create_image_artifact, create_markdown_artifact, create_progress_artifact, update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext

from flows.records import Manifest
from flows.store import ObjectStore
from tasks.context import run_logger

UI_LINK_EXPIRY_S = 7 * 24 * 3600  # the longest a presigned S3 link may live
BACKGROUND_THREADS = 4  # artifacts created at once inside artifacts_in_background


def artifact_key(training_id: str, kind: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{kind}-{training_id}".lower()).strip("-")


def in_run() -> bool:
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


class ProgressArtifact:
    """The training's progress bar on the run's page in the Prefect UI (percent of steps done)."""

    def __init__(self, training_id: str) -> None:
        self.training_id = training_id
        self._id: UUID | None = None

    def update(self, step: int, total: int) -> None:
        if not in_run():
            return
        percent = round(100.0 * step / max(total, 1), 1)
        try:
            if self._id is None:
                self._id = create_progress_artifact(percent, key=artifact_key(self.training_id, "training-progress"),
                                                    description=f"training steps of {self.training_id}")
            else:
                update_progress_artifact(self._id, percent)
        except Exception as exc:  # noqa: BLE001 - boundary to the Prefect API; progress is also in status.json
            run_logger().warning("could not update the progress artifact: %s", exc)


class _Background:
    """Artifacts being created on threads while the run goes on (see ``artifacts_in_background``)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(BACKGROUND_THREADS, thread_name_prefix="dreamflow-artifacts")
        self.pending: list[tuple[str, list[Future[object]]]] = []


_background: contextvars.ContextVar[_Background | None] = contextvars.ContextVar("dreamflow_artifacts", default=None)


@contextmanager
def artifacts_in_background() -> Iterator[None]:
    """Inside (a flow's body): a task that publishes artifacts goes on at once, and they are created
    on threads meanwhile; on the way out, every one of them is waited for, so the run ends with all
    its artifacts. Each is one API request of 50-130 ms to a busy embedded server, on the way to
    model_ready, which a person looking at the UI a moment later does not miss."""
    background = _Background()
    token = _background.set(background)
    try:
        yield
    finally:
        _background.reset(token)
        background.pool.shutdown(wait=True)
        for kind, futures in background.pending:
            _warn_on_failure(kind, futures)


def publish_artifacts(training_id: str, kind: str, markdown: str, description: str, images: dict[str, str],
                      wait: bool = False) -> None:
    """One markdown artifact and an image artifact per ``images`` entry, created at the same time
    (each is one API request; the run waits for the slowest, not their sum, or, inside
    ``artifacts_in_background`` and unless ``wait``, for none of them); nothing outside a Prefect run."""
    if not in_run():
        return
    creations = [partial(create_markdown_artifact, markdown, key=artifact_key(training_id, kind),
                         description=description)]
    creations += [partial(create_image_artifact, url, key=artifact_key(training_id, image_kind),
                          description=f"{image_kind.replace('-', ' ')} of {training_id}")
                  for image_kind, url in images.items()]
    background = None if wait else _background.get()
    pool = background.pool if background is not None else ThreadPoolExecutor(len(creations))
    # Each in the run's context (this task's, even once it has ended): the artifact is the task's.
    futures = [pool.submit(contextvars.copy_context().run, create) for create in creations]
    if background is not None:
        background.pending.append((kind, futures))
        return
    pool.shutdown(wait=True)
    _warn_on_failure(kind, futures)


def _warn_on_failure(kind: str, futures: list[Future[object]]) -> None:
    for future in futures:
        if future.exception() is not None:  # boundary to the Prefect API; the records are stored anyway
            run_logger().warning("could not publish %s artifacts: %s", kind, future.exception())
            return


def summary_markdown(manifest: Manifest, links: dict[str, str]) -> str:
    rows = "\n".join(f"| {name} | {f.size:,} bytes | `{f.sha256[:12]}` | [download]({links[name]}) |"
                     for name, f in manifest.files.items())
    images = "\n".join(f"![{name}]({url})" for name, url in links.items() if name in ("sample-grid", "loss-curve"))
    loss = f"{manifest.final_loss:.4f}" if manifest.final_loss is not None else "n/a"
    return (
        f"# Model {manifest.training_id}\n\n"
        f"- method **{manifest.method}** on **{manifest.base_model_id}** ({manifest.family})\n"
        f"- instance prompt: `{manifest.instance_prompt}`\n"
        f"- {manifest.steps} steps, final loss {loss}\n\n"
        f"| file | size | sha256 | link (7 days) |\n| --- | --- | --- | --- |\n{rows}\n\n{images}\n"
    )


def publish_model_artifacts(manifest: Manifest, store: ObjectStore) -> None:
    """The model summary, the sample grid and the loss curve in the Prefect UI."""
    links = {name: store.link(f.key, UI_LINK_EXPIRY_S) for name, f in manifest.files.items()}
    pictures = {"grid.png": "sample-grid", "loss_curve.png": "loss-curve"}
    images = {pictures[s.key.rsplit("/", 1)[-1]]: store.link(s.key, UI_LINK_EXPIRY_S)
              for s in manifest.samples if s.key.rsplit("/", 1)[-1] in pictures}
    publish_artifacts(manifest.training_id, "model-summary", summary_markdown(manifest, {**links, **images}),
                      f"model {manifest.training_id}", images)
