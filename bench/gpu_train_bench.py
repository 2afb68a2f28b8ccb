"""GPU training benchmark: LoRA r16 on an SD-1.5-sized UNet at 512 px, batch 1, bf16.

The UNet is built from the published SD 1.5 UNet config (values below) with random weights, so
nothing is downloaded. Three parts, each written into bench/results/gpu_train.json as it finishes:

1. **Step** (`--parts step`, `extra`): ms/step after warm-up, peak memory and MFU against 1.72 TFLOP per
   training step, for a bare loop (random latents 1x4x64x64, random text embeddings 1x77x768)
   and for dreamflow's own optimisation step (`tasks.train_engine._optimisation_step` through
   accelerate), each eager, with `torch.compile`, and with compile + CUDA graphs
   (`mode="reduce-overhead"`); the bare loop also with gradient checkpointing.
2. **Job** (`--parts job`): a whole `tasks.train_engine.train()` run, the code path a
   training's flow runs, on an SD-1.5-shaped random pipeline (UNet, VAE, CLIP text encoder)
   saved to disk: 15 images, 1000 steps, 512 px, with eager steps. Reports load/encode time, loop
   steps/s, total seconds and peak GPU memory (and the same job with `compile_unet=True`).
3. **Graph job** (`--parts graphjob`): the engine's CUDA-graph step (`cuda_graphs=True`, the
   default) against its eager step over 40 steps of the same job, loss by loss and adapter weight
   by weight; then the whole 1000-step job with it.

    python bench/gpu_train_bench.py                                    # on a machine with an NVIDIA GPU
    python bench/gpu_train_bench.py --device cpu --tiny --steps 2       # smoke test of the code paths

Without CUDA (and without `--device cpu`) it exits with status 2 and says why.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.published_configs import CLIP_VIT_L, SD15_UNET, SD_VAE

FLOP_PER_STEP = 1.72e12
"""Forward + backward of the SD 1.5 UNet at 64x64 latents, batch 1 (LoRA adds little)."""

BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Dense bf16 peak by device-name fragment (SXM figures)."""

TINY_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
}

TINY_VAE_CONFIG: dict[str, Any] = {
    **SD_VAE, "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (32, 32), "layers_per_block": 1, "sample_size": 16,
}

TINY_TEXT_CONFIG: dict[str, Any] = {
    **CLIP_VIT_L, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "projection_dim": 32,
}

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
COMPILE_MODES = {"eager": None, "compile": "default", "cudagraphs": "reduce-overhead"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--parts", default="step,graphjob,job,extra",
                        help="comma-separated: step, graphjob, job, extra (bare loop compiled, job with compile_unet)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per step variant")
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps per variant (compile happens here)")
    parser.add_argument("--job-steps", type=int, default=1000, help="optimisation steps of the whole-job part")
    parser.add_argument("--job-images", type=int, default=15)
    parser.add_argument("--compare-steps", type=int, default=40, help="steps of the graph-against-eager comparison")
    parser.add_argument("--tiny", action="store_true", help="tiny models (smoke test), not SD 1.5-sized")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "gpu_train.json")
    return parser.parse_args(argv)


def peak_flops(device_name: str) -> float | None:
    for fragment, flops in BF16_PEAK_FLOPS.items():
        if fragment in device_name:
            return flops
    return None


def build_unet(tiny: bool, device: str, dtype: Any, gradient_checkpointing: bool) -> Any:
    """Frozen UNet in `dtype` with an fp32 LoRA r16 on the attention projections (as the engine builds it)."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else SD15_UNET))
    unet.requires_grad_(False)
    unet.to(device, dtype=dtype)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=list(TARGET_MODULES)))
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def _compile(model: Any, mode: str | None) -> Any:
    import torch

    return model if mode is None else torch.compile(model, mode=mode)


def bare_step(args: argparse.Namespace, mode: str | None, gradient_checkpointing: bool) -> tuple[Callable[[], None], Any]:
    """The plainest LoRA step: forward under autocast, MSE to the noise, backward, fused AdamW."""
    import torch

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    unet = build_unet(args.tiny, args.device, dtype, gradient_checkpointing)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    model = _compile(unet, mode)
    config = TINY_UNET_CONFIG if args.tiny else SD15_UNET
    side, context = config["sample_size"], config["cross_attention_dim"]
    latents = torch.randn(1, 4, side, side, device=args.device)
    embeddings = torch.randn(1, 77, context, device=args.device)

    def step() -> None:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (1,), device=args.device)
        with torch.autocast(device_type=args.device, dtype=dtype, enabled=cuda):
            prediction = model(latents + noise, timesteps, encoder_hidden_states=embeddings).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, (unet, optimizer)


def engine_step(args: argparse.Namespace, mode: str | None, gradient_checkpointing: bool) -> tuple[Callable[[], None], Any]:
    """dreamflow's own optimisation step (accelerate backward, grad clipping, AdamW, LR schedule)."""
    import torch
    from diffusers import DDPMScheduler

    from tasks.engine_config import TrainConfig
    from tasks.engine_data import Dataset
    from tasks.engine_setup import Session, make_lr_scheduler, make_optimizer, new_accelerator
    from tasks.train_engine import _optimisation_step

    cuda = args.device == "cuda"
    precision = "bf16" if cuda else "no"
    config = TrainConfig(pretrained_path="unused", resolution=512, rank=16, max_train_steps=10_000, seed=0,
                         mixed_precision=precision, use_8bit_adam=False)
    accelerator = new_accelerator(precision)
    unet = build_unet(args.tiny, args.device, torch.bfloat16 if cuda else torch.float32, gradient_checkpointing)
    optimizer = make_optimizer(config, unet, None)
    lr_scheduler = make_lr_scheduler(optimizer, config)
    unet, optimizer, lr_scheduler = accelerator.prepare(_compile(unet, mode), optimizer, lr_scheduler)
    unet_config = TINY_UNET_CONFIG if args.tiny else SD15_UNET
    side, context, count = unet_config["sample_size"], unet_config["cross_attention_dim"], 15
    dataset = Dataset(
        latent_mean=torch.randn(count, 4, side, side, device=args.device),
        latent_std=torch.full((count, 4, side, side), 0.05, device=args.device),
        embeddings=torch.randn(count, 77, context, device=args.device),
        input_ids=torch.zeros(count, 77, dtype=torch.long, device=args.device),
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False)
    generator = torch.Generator(device=args.device).manual_seed(0)
    session = Session(accelerator, unet, None, scheduler, optimizer, lr_scheduler, dataset, None, generator,
                      torch.bfloat16 if cuda else torch.float32)
    counter = iter(range(1, 1_000_000))
    return (lambda: _optimisation_step(session, config, next(counter))), session


def time_variant(args: argparse.Namespace, loop: str, name: str, mode: str | None, checkpointing: bool) -> dict[str, Any]:
    import torch

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    build = bare_step if loop == "bare" else engine_step
    step, keep = build(args, mode, checkpointing)
    compile_started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    _sync(cuda)
    warmup_s = time.perf_counter() - compile_started
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(cuda)
    ms = (time.perf_counter() - started) * 1000 / args.steps
    result = {
        "loop": loop, "variant": name, "gradient_checkpointing": checkpointing, "ms_per_step": round(ms, 2),
        "warmup_s": round(warmup_s, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
    }
    del step, keep
    _release(cuda)
    return result


def step_plan(args: argparse.Namespace, extra: bool) -> list[tuple[str, str, str | None, bool]]:
    """(loop, variant, compile mode, gradient checkpointing) to time; `extra` = the bare loop compiled."""
    compiled = {} if args.no_compile or args.device == "cpu" else {k: v for k, v in COMPILE_MODES.items() if v}
    if extra:
        return [("bare", name, mode, False) for name, mode in compiled.items()]
    plan = [("bare", "eager", None, True), ("bare", "eager", None, False), ("engine", "eager", None, False)]
    return plan + [("engine", name, mode, False) for name, mode in compiled.items()]


def step_part(args: argparse.Namespace, peak: float | None, report: dict[str, Any], extra: bool = False) -> None:
    plan = step_plan(args, extra)
    variants = report.setdefault("step_variants", [])
    for loop, name, mode, checkpointing in plan:
        label = {"loop": loop, "variant": name, "gradient_checkpointing": checkpointing}
        result = _guarded(lambda: time_variant(args, loop, name, mode, checkpointing), label)  # noqa: B023 - called here
        _release(args.device == "cuda")
        if peak and not args.tiny and "ms_per_step" in result:
            result["mfu"] = round(FLOP_PER_STEP / (result["ms_per_step"] / 1000) / peak, 4)
        variants.append(result)
        print(json.dumps(result), flush=True)
        write(args, report)


def build_sd15_shaped_pipeline(folder: Path, tiny: bool) -> Path:
    """An SD-1.5-shaped pipeline with random weights (published layer sizes), saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tasks.tiny_models import _build_tokenizer

    tokenizer = _build_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    text_config = CLIPTextConfig(**{
        **(TINY_TEXT_CONFIG if tiny else CLIP_VIT_L), "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.eos_token_id,
    })
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init on the GPU: seconds instead of a minute
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**(TINY_VAE_CONFIG if tiny else SD_VAE)),
            text_encoder=CLIPTextModel(text_config),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else SD15_UNET)),
            scheduler=DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", clip_sample=False, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    return folder


def job_images(folder: Path, count: int, side: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"photo_{index:02d}.jpg"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def run_job(args: argparse.Namespace, model: Path, images: list[Path], out_dir: Path, options: dict[str, Any],
            steps: int | None = None, report_every: int | None = None) -> dict[str, Any]:
    """One whole `train()` run, the flow's code path; the loop's rate comes from its own progress events."""
    import torch

    from tasks.engine_config import ProgressEvent, TrainConfig
    from tasks.train_engine import train

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    events: list[tuple[float, ProgressEvent]] = []
    steps = steps or args.job_steps
    config = TrainConfig(
        pretrained_path=str(model), resolution=64 if args.tiny else 512, rank=16, max_train_steps=steps,
        seed=0, mixed_precision="bf16" if cuda else "no", use_8bit_adam=False,
        report_every=report_every or max(1, min(50, steps // 4)), **options,
    )
    started = time.perf_counter()
    result = train(config, images, ["a photo of sks person"] * len(images), out_dir,
                   on_progress=lambda event: events.append((time.perf_counter(), event)))
    total = time.perf_counter() - started
    first_time, first = events[0]
    last_time, last = events[-1]
    loop_rate = (last.step - first.step) / max(last_time - first_time, 1e-9)
    return {
        **options, "images": len(images), "steps": steps, "seconds_total": round(total, 2),
        "seconds_before_first_report": round(first_time - started, 2),
        "loop_steps_per_s": round(loop_rate, 2), "loop_ms_per_step": round(1000 / loop_rate, 2),
        "seconds_after_last_report": round(started + total - last_time, 2),
        "final_loss": round(result.final_loss, 5), "adapter_bytes": result.adapter_file.stat().st_size,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "losses": result.losses, "adapter_file": str(result.adapter_file),
    }


def job_part(args: argparse.Namespace, report: dict[str, Any], variants: list[dict[str, Any]]) -> None:
    jobs = report.setdefault("jobs", [])
    with job_inputs(args, report) as (root, model, images):
        for index, options in enumerate(variants):
            out = root / f"out{index}"
            result = _guarded(lambda o=options, d=out: run_job(args, model, images, d, o), options)
            result.pop("losses", None)
            jobs.append(result)
            print(json.dumps(result), flush=True)
            write(args, report)
            _release(args.device == "cuda")


@contextmanager
def job_inputs(args: argparse.Namespace, report: dict[str, Any]) -> Iterator[tuple[Path, Path, list[Path]]]:
    """A temporary folder with the SD-1.5-shaped pipeline and the job's photos."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        model = build_sd15_shaped_pipeline(root / "sd15-shaped", args.tiny)
        report["job_model_build_s"] = round(time.perf_counter() - started, 1)
        (root / "photos").mkdir()
        yield root, model, job_images(root / "photos", args.job_images, 96 if args.tiny else 768)


def _guarded(run: Callable[[], dict[str, Any]], label: dict[str, Any]) -> dict[str, Any]:
    try:
        return run()
    except Exception as exc:  # one variant failing must not lose the others' figures
        traceback.print_exc()
        return {**label, "error": repr(exc)[:400]}


def graph_job_part(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """The CUDA-graph step against the eager one (same seed, loss by loss, adapter weights), then a whole job."""
    from safetensors.torch import load_file

    part = report.setdefault("graph_job", {})
    compare_steps = args.compare_steps
    with job_inputs(args, report) as (root, model, images):
        runs = {}
        for name in ("eager", "graph"):
            options = {"compile_unet": False, "cuda_graphs": name == "graph"}
            runs[name] = _guarded(lambda o=options, n=name: run_job(args, model, images, root / f"cmp-{n}", o,
                                                                    steps=compare_steps, report_every=1), options)
            _release(args.device == "cuda")
        if all("losses" in run for run in runs.values()):
            eager, graph = ([loss for _, loss in runs[n]["losses"]] for n in ("eager", "graph"))
            weights = [load_file(runs[n]["adapter_file"]) for n in ("eager", "graph")]
            num = sum(float((weights[0][k].float() - weights[1][k].float()).norm() ** 2) for k in weights[0])
            den = sum(float(weights[0][k].float().norm() ** 2) for k in weights[0])
            part["compare"] = {
                "steps": compare_steps, "eager_losses": eager, "graph_losses": graph,
                "max_relative_loss_difference": max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager, graph)),
                "adapter_relative_difference": (num / max(den, 1e-30)) ** 0.5,
                "eager_ms_per_step": runs["eager"]["loop_ms_per_step"], "graph_ms_per_step": runs["graph"]["loop_ms_per_step"],
            }
        else:
            part["compare"] = {n: run.get("error") for n, run in runs.items()}
        print(json.dumps(part["compare"])[:1500], flush=True)
        write(args, report)
        options = {"compile_unet": False, "cuda_graphs": True}
        job = _guarded(lambda: run_job(args, model, images, root / "job", options), options)
        job.pop("losses", None)
        part["job"] = job
        print(json.dumps(job), flush=True)
        write(args, report)


def _sync(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()


def _release(cuda: bool) -> None:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def write(args: argparse.Namespace, report: dict[str, Any]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_train_bench: no CUDA device here; run it on a machine with an NVIDIA GPU "
              "(or use --device cpu --tiny --steps 2 for a smoke test)", file=sys.stderr)
        return 2
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False  # its algorithm search allocates huge workspaces (peak memory)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    peak = peak_flops(device_name)
    report: dict[str, Any] = {
        "benchmark": "gpu_train", "device": device_name, "torch": torch.__version__, "tiny": args.tiny,
        "resolution": 64 if args.tiny else 512, "batch": 1, "precision": "bf16" if args.device == "cuda" else "fp32",
        "lora_rank": 16, "flop_per_step": FLOP_PER_STEP, "peak_bf16_flops": peak, "warmup": args.warmup,
        "steps": args.steps,
    }
    parts = {part.strip() for part in args.parts.split(",")}
    can_compile = not args.no_compile and args.device == "cuda"
    if "step" in parts:
        step_part(args, peak, report)
    if "graphjob" in parts:
        graph_job_part(args, report)
    if "job" in parts:
        job_part(args, report, [{"compile_unet": False, "cuda_graphs": False}])
    if "extra" in parts and can_compile:  # last: the most compile time for the least news
        step_part(args, peak, report, extra=True)
        job_part(args, report, [{"compile_unet": True, "cuda_graphs": False}])
    write(args, report)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
