"""Benchmark: dreamflow's training loop against a plain diffusers-style reference loop, on `tiny`.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train_loop.py [--steps 60 --rounds 3]``.
Writes ``bench/results/train_loop.json`` and prints it.

Both loops train a rank-4 LoRA on the attention projections (to_q, to_k, to_v, to_out.0) of the
`tiny` UNet on the same 10 images (64 px crops, what the pipeline hands the trainer for `tiny`),
batch 1, fp32, AdamW, DDPM noise, epsilon MSE, grad clipping at 1.0, the same step count, one
torch thread. They run alternately (engine, reference, engine, ...) after one warm-up of each.

- engine: ``tasks.train_engine.train`` with ``report_every=1``; VAE latents and text embeddings
  are computed once before the loop (dreamflow's design), AdamW is torch's fused kernel and each
  LoRA linear runs as one matmul with ``W + s B A`` (same parameters and maths as peft's forward).
- engine_compiled: the same with ``compile_unet=True`` (torch.compile of the UNet), starting from
  an empty inductor kernel cache. Its untimed warm-up pays the whole compile
  (``warm_up_seconds_to_first_step``, what a first job pays); ``seconds_to_first_step`` of the timed
  runs is what a job pays once the cache holds the kernels (``--no-compile`` skips this loop).
- reference: the algorithm of diffusers' ``examples/dreambooth/train_dreambooth_lora.py``
  written out here: each step loads the image (DreamBoothDataset, dataloader_num_workers=0),
  tokenises the prompt, VAE-encodes the pixels and samples the latent, text-encodes the prompt,
  predicts noise, clips, steps AdamW (torch's default, per-tensor on CPU) and the constant LR
  schedule, and reads ``loss.detach().item()`` for the progress bar.
- time to the first step in a new process (after the timed loops): the compiled engine reusing the
  inductor cache the loops filled (what a second job on a worker pays, ``DREAMFLOW_COMPILE_UNET``
  with ``<data>/cache/inductor``), and the eager engine, each from the ``train(...)`` call and
  from the process start (imports included).

Only the loop is timed: steps/s = (steps - 1) / (time of the last step's end - time of the
first step's end), so model loading, caching and saving are excluded from both.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import load_average, write_result

PROMPT = "photo of sks person"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
RANK = 4
LEARNING_RATE = 1e-4
SEED = 0
IMAGE_COUNT = 10
TARGET_RATIO = 1.5


@dataclass
class LoopRun:
    """One timed run of a loop: end-of-step timestamps and losses."""

    name: str
    step_ends: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    first_step_s: float | None = None
    """From the call to the first step's end: loading, caching and (compiled) the compile."""

    @property
    def steps_per_second(self) -> float:
        if len(self.step_ends) < 2:
            raise ValueError("need at least 2 steps to time a loop")
        return (len(self.step_ends) - 1) / (self.step_ends[-1] - self.step_ends[0])

    def summary(self) -> dict[str, Any]:
        return {"steps": len(self.step_ends), "steps_per_second": self.steps_per_second,
                "seconds_to_first_step": self.first_step_s,
                "first_loss": self.losses[0], "last_loss": self.losses[-1],
                "all_losses_finite": all(math.isfinite(v) for v in self.losses)}


def prepare_images(folder: Path, count: int = IMAGE_COUNT, resolution: int = 64) -> list[Path]:
    """``count`` square PNG crops of the sample photos (mirrored copies fill up past six)."""
    from PIL import Image, ImageOps

    from tasks.sample_photos import sample_photo_count, write_sample_photos

    sources = write_sample_photos(folder / "src", sample_photo_count())
    paths = []
    for index in range(count):
        with Image.open(sources[index % len(sources)]) as opened:
            image = ImageOps.fit(opened.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
        if index >= len(sources):
            image = ImageOps.mirror(image)
        path = folder / f"{index:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def run_engine(pretrained: Path, images: Sequence[Path], steps: int, work: Path, compiled: bool = False) -> LoopRun:
    """dreamflow's ``train(...)`` (method lora), timed by its per-step progress events."""
    from tasks.engine_config import ProgressEvent, TrainConfig
    from tasks.train_engine import train

    run = LoopRun("engine_compiled" if compiled else "engine")
    started = time.perf_counter()

    def on_progress(event: ProgressEvent) -> None:
        run.step_ends.append(time.perf_counter())
        run.losses.append(event.loss)
        if len(run.step_ends) == 1:
            run.first_step_s = run.step_ends[0] - started

    config = TrainConfig(
        pretrained_path=str(pretrained), method="lora", resolution=64, rank=RANK, alpha=float(RANK),
        target_modules=TARGET_MODULES, learning_rate=LEARNING_RATE, max_train_steps=steps, seed=SEED,
        mixed_precision="no", use_8bit_adam=False, report_every=1, checkpoint_every=0, compile_unet=compiled,
    )
    out = Path(tempfile.mkdtemp(prefix="engine-", dir=work))
    try:
        train(config, list(images), [PROMPT] * len(images), out, on_progress=on_progress)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return run


@dataclass
class Reference:
    """The frozen models, LoRA and optimizer of the reference loop (train_dreambooth_lora.py's setup)."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler: Any
    optimizer: Any
    lr_scheduler: Any
    params: list[Any]


def load_reference(pretrained: Path) -> Reference:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(SEED)
    tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=list(TARGET_MODULES)))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # get_scheduler("constant")
    return Reference(tokenizer, text_encoder, vae, unet, scheduler, optimizer, lr_scheduler, params)


def load_example(path: Path, tokenizer: Any, resolution: int) -> tuple[Any, Any]:
    """DreamBoothDataset.__getitem__: open, exif-transpose, resize, centre-crop, normalise; tokenise."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    image = image.resize((max(resolution, round(width * scale)), max(resolution, round(height * scale))),
                         Image.Resampling.BILINEAR)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    ids = tokenizer(PROMPT, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    return ((pixels - 0.5) / 0.5).unsqueeze(0), ids


def reference_step(ref: Reference, path: Path, resolution: int) -> float:
    """One step of train_dreambooth_lora.py's loop (batch 1, no prior preservation, epsilon)."""
    import torch
    import torch.nn.functional as F

    pixel_values, input_ids = load_example(path, ref.tokenizer, resolution)
    model_input = ref.vae.encode(pixel_values).latent_dist.sample() * ref.vae.config.scaling_factor
    noise = torch.randn_like(model_input)
    timesteps = torch.randint(0, ref.scheduler.config.num_train_timesteps, (model_input.shape[0],)).long()
    noisy = ref.scheduler.add_noise(model_input, noise, timesteps)
    encoder_hidden_states = ref.text_encoder(input_ids, attention_mask=None, return_dict=False)[0]
    model_pred = ref.unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
    loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.params, 1.0)
    ref.optimizer.step()
    ref.lr_scheduler.step()
    ref.optimizer.zero_grad()
    return loss.detach().item()


def run_reference(pretrained: Path, images: Sequence[Path], steps: int, resolution: int = 64) -> LoopRun:
    """The reference loop: shuffled epochs over the images, everything encoded every step."""
    import random

    ref = load_reference(pretrained)
    order = random.Random(SEED)
    run = LoopRun("reference")
    queue: list[Path] = []
    for _ in range(steps):
        if not queue:
            queue = list(images)
            order.shuffle(queue)
        run.losses.append(reference_step(ref, queue.pop(), resolution))
        run.step_ends.append(time.perf_counter())
    return run


def reference_breakdown(pretrained: Path, images: Sequence[Path], steps: int, resolution: int = 64) -> dict[str, float]:
    """Median milliseconds of each phase of the reference step (what caching can and cannot save)."""
    import torch
    import torch.nn.functional as F

    ref = load_reference(pretrained)
    phases: dict[str, list[float]] = {}

    def timed(name: str, begin: float) -> float:
        now = time.perf_counter()
        phases.setdefault(name, []).append(1000 * (now - begin))
        return now

    for step in range(steps + 1):
        begin = time.perf_counter()
        pixel_values, input_ids = load_example(images[step % len(images)], ref.tokenizer, resolution)
        begin = timed("load_image_and_tokenize", begin)
        model_input = ref.vae.encode(pixel_values).latent_dist.sample() * ref.vae.config.scaling_factor
        begin = timed("vae_encode", begin)
        hidden = ref.text_encoder(input_ids, attention_mask=None, return_dict=False)[0]
        begin = timed("text_encode", begin)
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, ref.scheduler.config.num_train_timesteps, (1,)).long()
        pred = ref.unet(ref.scheduler.add_noise(model_input, noise, timesteps), timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        begin = timed("unet_forward", begin)
        loss.backward()
        begin = timed("unet_backward", begin)
        torch.nn.utils.clip_grad_norm_(ref.params, 1.0)
        ref.optimizer.step()
        ref.lr_scheduler.step()
        ref.optimizer.zero_grad()
        loss.detach().item()
        timed("clip_optimizer_item", begin)
    medians = {name: statistics.median(values[1:]) for name, values in phases.items()}  # first step is warm-up
    medians["total"] = sum(medians.values())
    return medians


def first_step_in_new_process(pretrained: Path, images: Sequence[Path], compiled: bool) -> dict[str, float]:
    """Start this script again to train 2 steps; its time to the first step, from ``train(...)`` and from the spawn.

    The child inherits ``TORCHINDUCTOR_CACHE_DIR``, so a compiled child finds the kernels the loops cached.
    """
    import json
    import subprocess

    command = [sys.executable, __file__, "--first-step", "engine_compiled" if compiled else "engine",
               "--pretrained", str(pretrained), "--images", *map(str, images)]
    spawned = time.time()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    child = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds_to_first_step": child["seconds_to_first_step"],
            "seconds_from_process_start": child["first_step_at"] - spawned}


def report_first_step(loop: str, pretrained: Path, images: list[Path]) -> int:
    """Child side of ``first_step_in_new_process``: one 2-step run, its timings as one JSON line."""
    import json

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-first-step-") as work:
        run = run_engine(pretrained, images, 2, Path(work), compiled=loop == "engine_compiled")
    first_step_at = time.time() - (time.perf_counter() - run.step_ends[0])
    sys.stdout.write(json.dumps({"seconds_to_first_step": run.first_step_s, "first_step_at": first_step_at}) + "\n")
    return 0


def alternate(loops: dict[str, Callable[[], LoopRun]], rounds: int,
              warm_ups: dict[str, LoopRun] | None = None) -> dict[str, list[LoopRun]]:
    """One untimed warm-up of each loop (kept in ``warm_ups``), then ``rounds`` rounds running each loop in turn."""
    for name, run in loops.items():
        done = run()
        if warm_ups is not None:
            warm_ups[name] = done
    timed: dict[str, list[LoopRun]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, run in loops.items():
            timed[name].append(run())
    return timed


def figures(timed: dict[str, list[LoopRun]], steps: int, rounds: int) -> dict[str, Any]:
    """The JSON body: per-loop runs and medians, and the engine/reference ratio of medians."""
    loops = {}
    for name, runs in timed.items():
        rates = [r.steps_per_second for r in runs]
        loops[name] = {"median_steps_per_second": statistics.median(rates), "runs": [r.summary() for r in runs]}
    reference = loops["reference"]["median_steps_per_second"]
    ratio = loops["engine"]["median_steps_per_second"] / reference
    compiled = loops.get("engine_compiled")
    compiled_ratio = compiled["median_steps_per_second"] / reference if compiled else None
    return {
        "setup": {"model": "tiny (built-in, random weights)", "method": "lora", "rank": RANK,
                  "target_modules": list(TARGET_MODULES), "images": IMAGE_COUNT, "resolution": 64,
                  "batch_size": 1, "precision": "fp32", "device": "cpu", "steps_per_run": steps,
                  "rounds": rounds, "warm_up_runs_per_loop": 1, "order": "alternating engine, reference",
                  "torch_threads": 1, "timing": "steps/s = (steps-1) / (last step end - first step end)"},
        "loops": loops,
        "ratio_engine_over_reference": ratio,
        "ratio_engine_compiled_over_reference": compiled_ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "meets_target_with_compile_unet": compiled_ratio is not None and compiled_ratio >= TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the engine with compile_unet=True")
    parser.add_argument("--out-dir", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument("--first-step", choices=["engine", "engine_compiled"], help=argparse.SUPPRESS)
    parser.add_argument("--pretrained", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.first_step:
        return report_first_step(args.first_step, args.pretrained, args.images)

    import torch

    from tasks.tiny_models import build_tiny_sd

    torch.set_num_threads(1)  # two shared cores: one thread keeps OpenMP spin-waits out of the figures
    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="bench-train-loop-"))
    try:
        pretrained = build_tiny_sd(work / "tiny")
        images = prepare_images(work / "images")
        loops = {"engine": lambda: run_engine(pretrained, images, args.steps, work),
                 "reference": lambda: run_reference(pretrained, images, args.steps)}
        if not args.no_compile:
            loops["engine_compiled"] = lambda: run_engine(pretrained, images, args.steps, work, compiled=True)
        if not args.no_compile:  # an empty kernel cache: the warm-up pays the whole compile, as a first job would
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-cache")
        started = time.perf_counter()
        warm_ups: dict[str, LoopRun] = {}
        body = figures(alternate(loops, args.rounds, warm_ups), args.steps, args.rounds)
        body["wall_s"] = time.perf_counter() - started
        body["warm_up_seconds_to_first_step"] = {name: run.first_step_s for name, run in warm_ups.items()}
        if not args.no_compile:
            body["compile_time_to_first_step"] = {
                "cold_cache_in_process_s": warm_ups["engine_compiled"].first_step_s,
                "warm_cache_new_process": first_step_in_new_process(pretrained, images, compiled=True),
                "eager_new_process": first_step_in_new_process(pretrained, images, compiled=False),
            }
        breakdown = reference_breakdown(pretrained, images, args.steps)
        cacheable = breakdown["load_image_and_tokenize"] + breakdown["vae_encode"] + breakdown["text_encode"]
        body["reference_step_breakdown_ms"] = breakdown
        body["reference_cacheable_share"] = cacheable / breakdown["total"]
        body["max_ratio_from_caching_alone"] = breakdown["total"] / (breakdown["total"] - cacheable)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    extra = {"results_dir": args.out_dir} if args.out_dir else {}
    path = write_result("train_loop", body, load_before, **extra)
    sys.stdout.write(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
