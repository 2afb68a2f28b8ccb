"""dreamflow settings: the one place that reads the environment (prefix ``DREAMFLOW_``).

Build them with :func:`get_settings` when a process needs them, never at import time.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, computed_field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of the facade, the worker and the embedded stack."""

    model_config = SettingsConfigDict(env_prefix="DREAMFLOW_", extra="ignore", frozen=True)

    api_keys: str = Field("", description="Comma-separated API keys accepted by the facade.")
    data_dir: Path = Field(Path(".dreamflow"), description="Root of local storage, caches and Prefect home.")
    api_host: str = Field("127.0.0.1", description="Facade bind address.")
    api_port: int = Field(8000, description="Facade port.")
    prefect_port: int = Field(4200, description="Port of the embedded Prefect server.")
    prefect_api_url: str | None = Field(None, description="Use this Prefect server instead of starting one.")
    storage: Literal["local", "s3"] = Field("local", description="Artifact storage backend.")
    s3_endpoint: str | None = Field(None, description="host:port of the S3/MinIO server.")
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_bucket: str = "dreamflow"
    s3_secure: bool = False
    s3_region: str | None = None
    s3_public_endpoint: str | None = Field(
        None, description="host:port (or URL) at which clients reach the S3 server, when it differs from "
                          "s3_endpoint (a compose or cluster-internal name); download links are signed for it.",
    )
    public_url: str | None = Field(None, description="Base of links handed to clients.")
    webhook_secret: str | None = Field(None, description="Standard Webhooks signing secret.")
    allow_private_networks: bool = Field(False, description="Let image/webhook URLs reach private addresses.")
    gpu_slots: int = Field(1, ge=1, description="Trainings that may run at once per pool.")
    worker_runs: int = Field(2, ge=1, description="Flow runs one worker runs at once (a training and a cleanup, say).")
    work_pool: str = Field("dreamflow", description="Prefect work pool the deployments run on.")
    registry_file: Path | None = Field(None, description="Base-model registry overriding the bundled one.")
    link_expiry_s: int = Field(3600, ge=60, le=7 * 24 * 3600, description="Lifetime of download links.")
    link_secret: str | None = Field(None, description="Secret signing local download links (derived if unset).")
    max_images: int = Field(30, ge=1, description="Most images one training may use.")
    min_images: int = Field(1, ge=1, description="Fewest usable images after cropping; fewer fails the job.")
    max_image_bytes: int = Field(20 * 1024 * 1024, description="Largest single image download.")
    max_image_pixels: int = Field(40_000_000, description="Largest decoded image (width x height).")
    fetch_timeout_s: float = Field(15.0, description="Connect/read timeout of one image download.")
    face_margin: float = Field(0.6, ge=0, le=4, description="Space around the face in a crop, as a fraction of the face size.")
    duplicate_max_distance: int = Field(
        6, ge=0, le=64, description="Perceptual-hash bits within which two crops count as near-duplicates."
    )
    captioner: Literal["instance", "blip"] = Field(
        "instance", description="Caption generator: the instance prompt alone, or a BLIP model."
    )
    caption_model: str = Field(
        "Salesforce/blip-image-captioning-base",
        description="BLIP captioning model: a local folder, or a hub id when the worker is online.",
    )
    caption_max_new_tokens: int = Field(30, ge=1, le=200, description="Longest generated caption, in tokens.")
    max_train_steps_limit: int = Field(4000, ge=1, description="Upper bound of max_train_steps.")
    sandbox_steps: int = Field(30, ge=1, description="Training steps of a sandbox job.")
    max_queued: int = Field(
        100, ge=1, description="Trainings that may be queued or running at once; create requests past it get 429."
    )
    max_queued_per_key: int = Field(
        50, ge=1, description="Trainings one API key may have queued or running at once (its share of max_queued); "
                              "its create requests past it get 429, other keys' do not."
    )
    queue_retry_after_s: int = Field(30, ge=1, description="Retry-After (seconds) of a create refused by max_queued.")
    checkpoint_every: int = Field(100, ge=1, description="Training steps between checkpoints in the store.")
    warm_runner: bool = Field(
        True, description="Start flow runs as forks of a process that has torch, diffusers and Prefect imported."
    )
    resident_models: str = Field(
        "tiny",
        description="Comma-separated base_model_id values the warm runner keeps in memory (UNet, VAE, text "
        "encoders, tokenizers) so that jobs on them skip loading; empty for none.",
    )
    compile_unet: bool = Field(
        False, description="torch.compile the UNet (CUDA graphs on a GPU); kernels are cached in <data>/cache/inductor."
    )
    cuda_graphs: bool = Field(
        True, description="On a GPU, replay each training step as one CUDA graph (captured after 3 eager steps)."
    )
    test_stage_hold: bool = Field(
        False,
        description="Test only, never in production: a training that reports stage <name> waits there while the "
        "file <data dir>/test-stage-hold/<name> exists, so tests can act (cancel, stop a server) at a stage boundary.",
    )

    @computed_field  # type: ignore[prop-decorator]
    @cached_property
    def api_key_hashes(self) -> frozenset[str]:
        """Hashes of the accepted keys; the keys themselves are not kept elsewhere."""
        return frozenset(hash_key(k) for k in self.api_keys.split(",") if k.strip())

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def prefect_api(self) -> str:
        return self.prefect_api_url or f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def facade_url(self) -> str:
        return (self.public_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")

    @property
    def signing_secret(self) -> bytes:
        """Secret for signed local links: configured, or derived from the keys and data dir."""
        if self.link_secret:
            return self.link_secret.encode()
        seed = f"{self.api_keys}|{self.resolved_data_dir}".encode()
        return hashlib.sha256(b"dreamflow-links|" + seed).digest()


GPU_CONCURRENCY_LIMIT = "dreamflow-gpu"  # the global concurrency limit training holds, sized by gpu_slots
STAGE_LOGGER = "tasks"  # parent of the stage libraries' loggers (tasks.train_engine, tasks.kohya, ...)


def hash_key(key: str) -> str:
    """The stable, non-reversible id of an API key (also used as the owner tag)."""
    return hashlib.sha256(key.strip().encode()).hexdigest()[:24]


def get_settings() -> Settings:
    """Read the settings from the environment now."""
    return Settings()
