"""Base models kept in memory between jobs (tasks/resident.py): a job on a resident model skips
loading it and trains and samples exactly as a job that loads it from disk."""

from __future__ import annotations

import gc
import logging
import os
import shlex
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import PROMPT, config_for, one_torch_thread, subject, tiny  # noqa: F401
from PIL import Image

from flows.settings import Settings
from tasks import resident
from tasks.sampling import generate_samples
from tasks.train_engine import train


@pytest.fixture(autouse=True)
def nothing_resident() -> Iterator[None]:
    resident._components.clear()
    yield
    resident._components.clear()


def run_job(model: Path, photos: list[Path], out: Path) -> tuple[list[tuple[int, float]], list[np.ndarray]]:
    """Train a LoRA and sample from it: the job's loss history and sample pixels."""
    result = train(config_for(model), photos, [PROMPT] * len(photos), out / "model")
    samples = generate_samples(str(model), result.adapter_file, PROMPT, None, 2, 0, 64, out / "samples", steps=4)
    return result.losses, [np.asarray(Image.open(path)) for path in samples]


def test_a_job_on_a_resident_model_uses_it_and_matches_one_that_loads(
    tiny: Path, subject: list[Path], tmp_path: Path  # noqa: F811
) -> None:
    from_disk = run_job(tiny, subject, tmp_path / "disk")

    resident.load_resident(str(tiny), "sd15")
    unet = resident.borrow(str(tiny), "unet", torch.float32)
    assert [(part, dtype) for _, part, dtype in resident.resident()] == [
        ("text_encoder", "torch.float32"), ("tokenizer", ""), ("unet", "torch.float32"), ("vae", "torch.float32")]

    result = train(config_for(tiny), subject, [PROMPT] * len(subject), tmp_path / "model")
    # The training took the UNet (it added its adapter to that very object) and only ran the rest.
    assert [part for _, part, _ in resident.resident()] == ["text_encoder", "tokenizer", "vae"]
    assert any("lora" in name for name, _ in unet.named_parameters())
    samples = generate_samples(str(tiny), result.adapter_file, PROMPT, None, 2, 0, 64, tmp_path / "samples", steps=4)
    assert resident.resident() == []  # sampling, the job's last use, took the rest

    assert result.losses == from_disk[0]
    for image, expected in zip((np.asarray(Image.open(path)) for path in samples), from_disk[1], strict=True):
        assert np.array_equal(image, expected)


def test_a_model_that_cannot_load_is_skipped_and_jobs_load_it_themselves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DREAMFLOW_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    logger = logging.getLogger(resident.__name__)
    logger.addHandler(caplog.handler)  # Prefect's logging config may not let it propagate
    try:
        resident.preload_models(["no-such-model", "realistic-vision-v51"])  # unknown; a hub model not on this machine
    finally:
        logger.removeHandler(caplog.handler)
    assert resident.resident() == []
    assert "no-such-model not kept in memory" in caplog.text and "realistic-vision-v51 not kept in memory" in caplog.text


def test_the_warm_runner_preloads_the_configured_models_and_its_forks_train_on_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subject: list[Path]  # noqa: F811
) -> None:
    """The runner's preload makes `tiny` resident; a fork then trains on it (OpenMP threads set up
    afresh in the fork: a runner that had run torch ops on several threads made its forks crawl)."""
    from deployments import deferred_tls, warm_runner

    monkeypatch.setenv("DREAMFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DREAMFLOW_RESIDENT_MODELS", "tiny")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this test process's own count
    monkeypatch.setattr(ssl, "create_default_context", ssl.create_default_context)  # restored after the test
    try:
        warm_runner.preload()
    finally:
        gc.unfreeze()  # the runner freezes what it has for good; this test process goes on
    assert ssl.create_default_context is deferred_tls.create_default_context  # forks read no CA bundle unasked
    parts = {(Path(folder).name, part) for folder, part, _ in resident.resident()}
    assert parts == {("tiny", "unet"), ("tiny", "vae"), ("tiny", "text_encoder"), ("tiny", "tokenizer")}
    model = Path(resident.resident()[0][0])

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the fork: train on the resident UNet, report whether it was the resident one
        code = 1
        try:
            unet = resident.borrow(str(model), "unet", torch.float32)
            train(config_for(model, max_train_steps=2), subject, [PROMPT] * len(subject), tmp_path / "fork")
            os.write(write, b"took" if resident.borrow(str(model), "unet", torch.float32) is None and unet else b"no")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0 and os.read(read, 10) == b"took"
    assert ("tiny", "unet") in {(Path(folder).name, part) for folder, part, _ in resident.resident()}  # the runner keeps its own


def test_the_launcher_without_a_runner_becomes_prefects_own_flow_run_process(tmp_path: Path) -> None:
    """The pool's command starts the launcher without site-packages (``-S``); with no runner to ask, it
    becomes ``python -m prefect.engine`` with them (here it stops there: no flow run id is given)."""
    from deployments.stack import launch_command

    command = shlex.split(launch_command(Settings(data_dir=tmp_path, warm_runner=True)))
    assert command[1] == "-S"
    command[-1] = str(tmp_path / "no-runner.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT__FLOW_RUN")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "prefect/engine.py" in done.stderr, done.stderr[-2000:]


def test_prefect_settings_built_ahead_serve_only_launches_with_the_same_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner builds Prefect's settings for the environment of its last launch; a fork takes
    them only when its own environment and working folder give the same, and builds its own
    otherwise."""
    from prefect.settings import Settings as PrefectSettings

    from deployments import warm_runner

    monkeypatch.chdir(tmp_path)
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("PREFECT_")}
    env = {**base, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_LOGGING_LEVEL": "DEBUG",
           "PREFECT__FLOW_RUN_ID": "run-1", "PREFECT__CONTROL_TOKEN": "token-1"}
    first_run, next_run = tmp_path / "run-1", tmp_path / "run-2"
    first_run.mkdir()
    next_run.mkdir()
    before = dict(os.environ)
    ahead = warm_runner.build_settings_ahead(env, str(first_run))
    assert ahead is not None and dict(os.environ) == before and Path.cwd() == tmp_path  # the runner's own kept
    assert ahead.context.settings.logging.level == "DEBUG"
    assert ahead.context.settings.home == tmp_path / "home"

    # Another run of the same deployment: its own run variables and empty working folder.
    same = {**env, "PREFECT__FLOW_RUN_ID": "run-2", "PREFECT__CONTROL_TOKEN": "token-2", "OTHER": "x"}
    assert warm_runner.settings_for(ahead, same, str(next_run)) is ahead.context
    monkeypatch.setattr(os, "environ", os.environ.copy())  # what Prefect builds from them is the same
    os.environ.clear()
    os.environ.update(same)
    assert PrefectSettings() == ahead.context.settings

    # Anything Prefect's settings read that differs: the fork builds its own.
    assert warm_runner.settings_for(ahead, {**same, "PREFECT_LOGGING_LEVEL": "INFO"}, str(next_run)) is None
    assert warm_runner.settings_for(ahead, {**same, "prefect_api_url": "http://x"}, str(next_run)) is None
    assert warm_runner.settings_for(ahead, {**same, "HOME": "/elsewhere"}, str(next_run)) is None
    (next_run / "prefect.toml").write_text('[logging]\nlevel = "ERROR"\n')
    assert warm_runner.settings_for(ahead, same, str(next_run)) is None
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "home" / "profiles.toml").write_text('active = "other"\n[profiles.other]\n')
    assert warm_runner.settings_for(ahead, same, str(first_run)) is None
    assert warm_runner.settings_for(None, same, str(first_run)) is None
