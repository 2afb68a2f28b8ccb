"""Benchmark: where `tiny`'s CPU time goes in attention, for the training step and the samples.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_cpu_attention.py [--repeats 30]``.
Writes ``bench/results/cpu_attention.json`` and prints it.

Why the eager engine stops near 1.25x the reference loop on this CPU (bench_train_loop.py) and why
the samples take about a second of a warm job (bench_pipeline.py): `tiny` keeps SD's 8 attention
heads on 32 channels, so its attention is 8 heads of dimension 4 over 256 latent positions, and
the time goes to the softmax's exponentials (this CPU has no AVX2 for vectorised ones).

1. **Attention kernels** at `tiny`'s shapes, one torch thread: SDPA as it runs (the CPU flash
   kernel), SDPA forced to its math backend, and a plain matmul-softmax-matmul; forward alone and
   forward + backward, best of ``--repeats``.
2. **The engine's step**: ``train(...)`` (lora, 64 px, 1 thread, as bench_train_loop.py) under
   torch.profiler; the share of CPU time in the flash attention kernels, forward and backward.
3. **Samples**: two 64 px samples, 20 denoising steps, as the pipeline's samples stage renders them:
   torch's default threads, one thread, SDPA's math backend, diffusers' classic attention
   processor, and GNU OpenMP's passive wait policy (``OMP_WAIT_POLICY=PASSIVE``, a child process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import load_average, write_result

SHAPES = {  # (batch, heads, queries, keys, head dim)
    "self_attention_training": (1, 8, 256, 256, 4),
    "cross_attention_training": (1, 8, 256, 77, 4),
    "self_attention_samples": (4, 8, 256, 256, 4),  # 2 samples x classifier-free guidance
}
PROMPT = "a photo of sks person"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per attention variant")
    parser.add_argument("--sample-runs", type=int, default=3, help="timed renders per samples variant (best kept)")
    parser.add_argument("--train-steps", type=int, default=20, help="profiled engine steps")
    parser.add_argument("--render-child", help=argparse.SUPPRESS)  # a tiny model folder: time one render, print it
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    return parser.parse_args(argv)


def attention_variants() -> dict[str, Callable[..., Any]]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def math(q: Any, k: Any, v: Any) -> Any:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    def manual(q: Any, k: Any, v: Any) -> Any:
        return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v

    return {"sdpa_flash_cpu": F.scaled_dot_product_attention, "sdpa_math": math, "matmul_softmax": manual}


def best_ms(run: Callable[[], Any], repeats: int) -> float:
    for _ in range(3):
        run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 3)


def attention_part(repeats: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for name, (batch, heads, queries, keys, dim) in SHAPES.items():
        q = torch.randn(batch, heads, queries, dim, requires_grad=True)
        k = torch.randn(batch, heads, keys, dim, requires_grad=True)
        v = torch.randn(batch, heads, keys, dim, requires_grad=True)
        row: dict[str, Any] = {"shape": [batch, heads, queries, keys, dim]}
        for label, attend in attention_variants().items():
            def forward(a: Callable[..., Any] = attend, x: tuple[Any, ...] = (q, k, v)) -> None:
                with torch.no_grad():
                    a(*x)

            def both(a: Callable[..., Any] = attend, x: tuple[Any, ...] = (q, k, v)) -> None:
                a(*x).sum().backward()

            row[label] = {"forward_ms": best_ms(forward, repeats), "forward_backward_ms": best_ms(both, repeats)}
        results[name] = row
        print(json.dumps({name: row}), flush=True)
    return results


def engine_part(tiny: Path, steps: int) -> dict[str, Any]:
    import torch
    from bench_train_loop import prepare_images, run_engine
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        images = prepare_images(Path(tmp) / "photos")
        run_engine(tiny, images, 4, Path(tmp))  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run = run_engine(tiny, images, steps, Path(tmp))
    self_us: dict[str, float] = {}
    for event in prof.key_averages():
        self_us[event.key] = self_us.get(event.key, 0.0) + event.self_cpu_time_total
    total = sum(self_us.values())
    forward = sum(us for key, us in self_us.items() if key == "aten::_scaled_dot_product_flash_attention_for_cpu")
    backward = sum(us for key, us in self_us.items()
                   if key.startswith("aten::_scaled_dot_product_flash_attention_for_cpu_backward"))
    result = {
        "steps": steps, "steps_per_second_under_profiler": round(run.steps_per_second, 2),
        "attention_forward_share": round(forward / total, 3), "attention_backward_share": round(backward / total, 3),
        "attention_ms_per_step": round((forward + backward) / 1000 / steps, 2),
        "profiled_cpu_ms_per_step": round(total / 1000 / steps, 2),
    }
    print(json.dumps({"engine_step": result}), flush=True)
    return result


def render_seconds(tiny: Path, runs: int, attention: str = "default") -> float:
    import torch

    from tasks.sampling import load_pipeline, render

    pipe = load_pipeline(str(tiny))
    context: Any = nullcontext()
    if attention == "sdpa_math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel(SDPBackend.MATH)
    elif attention == "classic_processor":
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
    with context, torch.inference_mode():
        return round(best_ms(lambda: render(pipe, PROMPT, "blurry", 2, 0, 64, 20), runs) / 1000, 3)


def samples_part(tiny: Path, runs: int) -> dict[str, Any]:
    import torch

    threads = torch.get_num_threads()
    result: dict[str, Any] = {"samples": 2, "steps": 20, "resolution": 64, "default_threads": threads}
    result["default_s"] = render_seconds(tiny, runs)
    torch.set_num_threads(1)
    result["one_thread_s"] = render_seconds(tiny, runs)
    torch.set_num_threads(threads)
    result["sdpa_math_s"] = render_seconds(tiny, runs, "sdpa_math")
    result["classic_processor_s"] = render_seconds(tiny, runs, "classic_processor")
    child = subprocess.run(
        [sys.executable, __file__, "--render-child", str(tiny), "--sample-runs", str(runs)],
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True, check=True,
    )
    result["omp_passive_s"] = float(child.stdout.strip().splitlines()[-1])
    print(json.dumps({"samples": result}), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_child:
        print(render_seconds(Path(args.render_child), args.sample_runs))
        return 0
    from tasks.tiny_models import build_tiny_sd

    before = load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_sd(Path(tmp) / "tiny")
        figures = {
            "attention": attention_part(args.repeats),
            "engine_step": engine_part(tiny, args.train_steps),
        }
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        figures["samples"] = samples_part(tiny, args.sample_runs)
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    path = write_result("cpu_attention", figures, before, **({"results_dir": args.out} if args.out else {}))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
