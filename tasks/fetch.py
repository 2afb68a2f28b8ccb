"""Stage 1: fetch the training images (http(s), data: URIs, dreamflow's own links)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from prefect import task

from flows.imagebytes import STORE_SCHEME
from flows.params import TrainingStatus
from flows.store import LocalStore, ObjectNotFound, ObjectStore
from tasks import fetching
from tasks.context import report_stage, run_logger, worker_settings, worker_store, workdir


class NoUsableImages(RuntimeError):
    """Every image of a request failed to download."""


def own_link_key(url: str, store: ObjectStore, facade_url: str) -> str | None:
    """The store key behind one of dreamflow's own download links, or None for foreign URLs."""
    parts = urlsplit(url)
    files_base = f"{facade_url}/files/"
    if isinstance(store, LocalStore) and url.startswith(files_base):
        return unquote(parts.path.split("/files/", 1)[1])
    bucket_base = getattr(store, "public_base", None)
    if bucket_base and url.startswith(bucket_base):
        return unquote(parts.path.split("/", 2)[2])
    return None


def _reader(store: ObjectStore, facade_url: str, training_id: str) -> Callable[[str], bytes | None]:
    """Reads ``store:`` references and dreamflow's own links straight from storage."""
    own_prefixes = ("uploads/", f"trainings/{training_id}/inputs/")

    def read_own(url: str) -> bytes | None:
        key = url.removeprefix(STORE_SCHEME) if url.startswith(STORE_SCHEME) else own_link_key(url, store, facade_url)
        if key is None or not key.startswith(own_prefixes):
            return None
        try:
            return store.get_bytes(key)
        except ObjectNotFound:
            return None

    return read_own


@task(name="fetch-images")
def fetch_images(training_id: str, urls: list[str]) -> list[str]:
    """Download every image of a request into the training's work folder; return the local paths."""
    settings = worker_settings()
    report_stage(training_id, TrainingStatus.DEPLOYING_GPU, "fetching", f"fetching {len(urls)} images")
    limits = fetching.FetchLimits(
        max_bytes=settings.max_image_bytes,
        timeout_s=settings.fetch_timeout_s,
        allow_private=settings.allow_private_networks,
    )
    paths, errors = fetching.fetch_images(urls, workdir(training_id, "raw"), limits, _reader(worker_store(), settings.facade_url, training_id))
    for error in errors:
        run_logger().warning("image skipped: %s", error)
    if not paths:
        reasons = "; ".join(str(e) for e in errors)
        raise NoUsableImages(f"none of the {len(urls)} images could be fetched: {reasons}")
    return [str(p) for p in paths]
