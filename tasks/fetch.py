"""Stage 1: fetch the training images (http(s), data: URIs, dreamflow's own links)."""

from __future__ import annotations

from collections.abc import Callable

from prefect import task

from flows.imagebytes import STORE_SCHEME
from flows.params import TrainingParams, TrainingStatus
from flows.store import ObjectNotFound, ObjectStore
from tasks import fetching
from tasks.context import report_stage, run_logger, worker_settings, worker_store, workdir
from tasks.registration import timed_stage


class NoUsableImages(RuntimeError):
    """Every image of a request failed to download."""


def own_reader(store: ObjectStore, training_id: str, owner: str) -> Callable[[str], bytes | None]:
    """Reads ``store:`` references and dreamflow's own links from storage.

    ``store:`` keys (which the facade refuses from clients: they come from the UI, a schedule or the
    facade's own stored inputs) may name uploads, this training's inputs and dataset folders. A link
    to the store is read directly only for the owner's own uploads and this training's inputs; any
    other link is fetched like every URL, so it has to be one the store itself accepts (presigned,
    unexpired) and pass the private-address check.
    """
    by_reference = ("uploads/", f"trainings/{training_id}/inputs/", "datasets/")
    by_link = (f"uploads/{owner}/", f"trainings/{training_id}/inputs/")

    def read_own(url: str) -> bytes | None:
        if url.startswith(STORE_SCHEME):
            key, allowed = url.removeprefix(STORE_SCHEME), by_reference
        else:
            key, allowed = store.key_from_link(url), by_link
        if key is None or not key.startswith(allowed):
            return None
        try:
            return store.get_bytes(key)
        except ObjectNotFound:
            return None

    return read_own


@task(name="fetch-images")
@timed_stage
def fetch_images(params: TrainingParams) -> list[str]:
    """Download every image of a request into the training's work folder; return the local paths."""
    settings = worker_settings()
    training_id, urls = params.training_id, params.images
    report_stage(training_id, TrainingStatus.DEPLOYING_GPU, "fetching", f"fetching {len(urls)} images",
                 webhook=params.webhook)
    limits = fetching.FetchLimits(
        max_bytes=settings.max_image_bytes,
        timeout_s=settings.fetch_timeout_s,
        allow_private=settings.allow_private_networks,
    )
    read_own = own_reader(worker_store(), training_id, params.owner)
    paths, errors = fetching.fetch_images(urls, workdir(training_id, "raw"), limits, read_own)
    for error in errors:
        run_logger().warning("image skipped: %s", error)
    if not paths:
        reasons = "; ".join(str(e) for e in errors)
        raise NoUsableImages(f"none of the {len(urls)} images could be fetched: {reasons}")
    return [str(p) for p in paths]
