"""Where a LoRA training step's GPU time goes, and which options cut it (SD 1.5-sized UNet, 512 px, batch 1).

`gpu_train_bench.py` showed that the eager step is bound by the CPU launching kernels (~130 ms on an
H200) and that compile + CUDA graphs brings it to the GPU's own time (~21 ms). This script times the
options that change that GPU time, each one cheaply:

1. **Graph-captured eager steps**: the whole bare step (forward under autocast, backward, fused
   AdamW with `capturable=True`) captured once in a `torch.cuda.CUDAGraph` and replayed, for each
   of: NCHW or channels-last activations, cuDNN's algorithm search on or off, the SDPA backend
   (default, flash, cuDNN, memory-efficient), and the precision: autocast with fp32 LoRA weights (what
   the engine does), everything in bf16 (`bf16`), or a bf16 UNet with fp32 LoRA weights and no
   autocast (`bf16-base`), or bf16 adapter weights as views of one flat buffer stepped through
   an fp32 master copy (`bf16-master`: fp32 optimizer state and updates, bf16 compute, no autocast).
   Capture takes seconds where `torch.compile` takes minutes, so each option is one replay timing.
2. **Kernel breakdown** of one step of the best captured variant (torch.profiler): GPU time by kind
   of kernel (matrix products, convolutions, attention, normalisation, the rest) and kernel count.
3. **Compiled** (`torch.compile(mode="reduce-overhead")`, last, the slowest to set up): the
   plain options, as `gpu_train_bench.py` runs them, and the best captured options.

    python bench/gpu_step_variants.py                     # on a machine with an NVIDIA GPU
    python bench/gpu_step_variants.py --parts captured     # skip the compiled variants

Results go to bench/results/gpu_step_variants.json, rewritten after every variant.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_train_bench import (
    FLOP_PER_STEP, SD15_UNET, TINY_UNET_CONFIG, _guarded, _release, _sync, build_unet, peak_flops, write,
)

KERNEL_KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.IGNORECASE)),
    ("convolution", re.compile(r"conv|fprop|dgrad|wgrad|implicit_gemm|cudnn", re.IGNORECASE)),
    ("matrix product", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm90_", re.IGNORECASE)),
    ("normalisation", re.compile(r"norm", re.IGNORECASE)),
    ("optimizer", re.compile(r"adam|multi_tensor", re.IGNORECASE)),
)

BASE: dict[str, Any] = {"channels_last": False, "cudnn_benchmark": False, "sdpa": None, "precision": "autocast"}
CAPTURED = [
    {},
    {"channels_last": True},
    {"cudnn_benchmark": True},
    {"channels_last": True, "cudnn_benchmark": True},
    {"sdpa": "flash"},
    {"sdpa": "cudnn"},
    {"sdpa": "efficient"},
    {"precision": "bf16"},
    {"precision": "bf16-master"},
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="captured,profile,compiled", help="comma-separated: captured, profile, compiled")
    parser.add_argument("--captured", type=json.loads, default=None,
                        help='JSON list of option changes to capture instead of the default list, e.g. '
                        '\'[{"channels_last": true, "precision": "bf16-base"}]\'')
    parser.add_argument("--compile-modes", default="reduce-overhead",
                        help="comma-separated torch.compile modes of the compiled part, e.g. "
                             "reduce-overhead,max-autotune (both capture CUDA graphs; max-autotune also "
                             "searches kernel configurations: minutes more to compile)")
    parser.add_argument("--steps", type=int, default=30, help="timed replays (or eager steps) per variant")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny UNet; with --device cpu, the smoke test of the code")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "gpu_step_variants.json")
    return parser.parse_args(argv)


def sdpa_context(name: str | None) -> Any:
    if name is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    return sdpa_kernel([backend])


class Step:
    """One bare LoRA training step with fixed inputs, built for one set of options."""

    def __init__(self, args: argparse.Namespace, options: dict[str, Any], compile_mode: str | None = None) -> None:
        import torch

        torch.backends.cudnn.benchmark = options["cudnn_benchmark"]
        self.options, self.device = options, args.device
        cuda = args.device == "cuda"
        self.unet = build_unet(args.tiny, args.device, torch.bfloat16, gradient_checkpointing=False)
        if options["precision"] in ("bf16", "bf16-master"):
            self.unet.to(dtype=torch.bfloat16)  # the LoRA weights too; no autocast
        memory_format = torch.channels_last if options["channels_last"] else torch.contiguous_format
        self.unet.to(memory_format=memory_format)
        params = [p for p in self.unet.parameters() if p.requires_grad]
        self.master: Any = None
        if options["precision"] == "bf16-master":
            self.working, self.working_grad, self.master = flat_master(params)
            params = [self.master]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True, capturable=cuda and compile_mode is None)
        self.model = self.unet if compile_mode is None else torch.compile(self.unet, mode=compile_mode)
        config = TINY_UNET_CONFIG if args.tiny else SD15_UNET
        side, context = config["sample_size"], config["cross_attention_dim"]
        dtype = torch.float32 if options["precision"] == "autocast" else torch.bfloat16
        self.latents = torch.randn(1, 4, side, side, device=args.device, dtype=dtype).to(memory_format=memory_format)
        self.embeddings = torch.randn(1, 77, context, device=args.device, dtype=dtype)
        self.graph: Any = None

    def __call__(self) -> None:
        import torch

        noise = torch.randn_like(self.latents)
        timesteps = torch.randint(0, 1000, (1,), device=self.device)
        autocast = torch.autocast(self.device, dtype=torch.bfloat16, cache_enabled=False,
                                  enabled=self.options["precision"] == "autocast")
        with sdpa_context(self.options["sdpa"]), autocast:
            prediction = self.model(self.latents + noise, timesteps, encoder_hidden_states=self.embeddings).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        if self.master is not None:
            self.working_grad.zero_()
            loss.backward()  # accumulates into views of working_grad
            self.master.grad.copy_(self.working_grad)
            self.optimizer.step()
            with torch.no_grad():
                self.working.copy_(self.master)
            return
        loss.backward()
        self.optimizer.step()
        if self.graph is None:
            self.optimizer.zero_grad(set_to_none=True)

    def capture(self) -> None:
        """Warm up on a side stream, then capture one whole step; replays overwrite the same grads."""
        import torch

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self()
        torch.cuda.current_stream().wait_stream(stream)
        if self.master is None:
            self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        self.graph = graph
        with torch.cuda.graph(graph):
            self()

    def replay(self) -> None:
        self.graph.replay()


def flat_master(params: list[Any]) -> tuple[Any, Any, Any]:
    """Make the bf16 `params` views of one flat bf16 buffer, their grads views of another, and return
    both with an fp32 master copy (a leaf with its grad allocated) for the optimizer to step: two
    cast-copies per step instead of autocast's casts of every adapter weight and norm input."""
    import torch

    total = sum(p.numel() for p in params)
    working = torch.empty(total, dtype=params[0].dtype, device=params[0].device)
    working_grad = torch.zeros_like(working)
    offset = 0
    for param in params:
        size = param.numel()
        working[offset:offset + size].copy_(param.detach().reshape(-1))
        param.data = working[offset:offset + size].view_as(param)
        param.grad = working_grad[offset:offset + size].view_as(param)
        offset += size
    master = torch.nn.Parameter(working.float())
    master.grad = torch.zeros_like(master)
    return working, working_grad, master


def timed(run: Any, steps: int, cuda: bool) -> float:
    _sync(cuda)
    started = time.perf_counter()
    for _ in range(steps):
        run()
    _sync(cuda)
    return (time.perf_counter() - started) * 1000 / steps


def with_figures(result: dict[str, Any], peak: float | None, key: str) -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if peak and key in result:
        result["mfu"] = round(FLOP_PER_STEP / (result[key] / 1000) / peak, 4)
    return result


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def captured_variant(args: argparse.Namespace, options: dict[str, Any], peak: float | None) -> dict[str, Any]:
    reset_peak()
    step = Step(args, options)
    for _ in range(3):
        step()
    cuda = args.device == "cuda"
    result = {**options, "eager_ms_per_step": round(timed(step, max(5, args.steps // 3), cuda), 2)}
    if cuda:
        started = time.perf_counter()
        step.capture()
        result["capture_s"] = round(time.perf_counter() - started, 2)
        result["graph_ms_per_step"] = round(timed(step.replay, args.steps, cuda), 2)
    del step
    _release(cuda)
    return with_figures(result, peak, "graph_ms_per_step")


def compiled_variant(args: argparse.Namespace, options: dict[str, Any], peak: float | None,
                     mode: str = "reduce-overhead") -> dict[str, Any]:
    import torch

    torch._dynamo.reset()
    reset_peak()
    cuda = args.device == "cuda"
    mode = mode if cuda else "default"
    step = Step(args, options, compile_mode=mode)
    started = time.perf_counter()
    for _ in range(6):
        step()
    _sync(cuda)
    result = {**options, "compile_mode": mode, "warmup_s": round(time.perf_counter() - started, 1),
              "ms_per_step": round(timed(step, args.steps, cuda), 2)}
    del step
    _release(cuda)
    return with_figures(result, peak, "ms_per_step")


def kernel_breakdown(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """GPU time per kind of kernel in one eager step (the same kernels a captured replay runs)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device == "cuda"
    step = Step(args, options)
    for _ in range(3):
        step()
    _sync(cuda)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
        _sync(cuda)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == ("kernel" if cuda else "cpu_op") and "dur" in e]
    kinds: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for kernel in kernels:
        kind = next((k for k, pattern in KERNEL_KINDS if pattern.search(kernel["name"])), "elementwise and other")
        kinds[kind] = kinds.get(kind, 0.0) + kernel["dur"] / 1000
        by_name.setdefault(kernel["name"][:120], []).append(kernel["dur"] / 1000)
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:15]
    del step
    _release(cuda)
    return {
        **options, "kernels": len(kernels), "kernel_ms": round(sum(kinds.values()), 2),
        "kernel_ms_by_kind": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "kernels_under_10us": sum(1 for k in kernels if k["dur"] < 10),
        "top_kernels": [{"name": name, "count": len(durs), "ms": round(sum(durs), 3)} for name, durs in top],
    }


def attempt(report: dict[str, Any], key: str, args: argparse.Namespace, run: Any, label: dict[str, Any]) -> None:
    result = _guarded(run, label)
    _release(args.device == "cuda")
    report.setdefault(key, []).append(result)
    print(json.dumps(result)[:700], flush=True)
    write(args, report)


def best_options(report: dict[str, Any]) -> dict[str, Any]:
    """The base options plus each single change that beat the base replay by more than 2 %."""
    timed_ones = [r for r in report.get("captured", []) if "graph_ms_per_step" in r]
    best = dict(BASE)
    if not timed_ones:
        return best
    baseline = timed_ones[0]["graph_ms_per_step"]
    faster = sorted((r for r in timed_ones[1:] if r["graph_ms_per_step"] < baseline * 0.98),
                    key=lambda r: -r["graph_ms_per_step"])  # the fastest last: its choice of SDPA backend wins
    for result in faster:
        best.update({k: result[k] for k in BASE if result[k] != BASE[k]})
    return best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_step_variants: no CUDA device here; run it on a machine with an NVIDIA GPU "
              "(or --device cpu --tiny --steps 2 as a smoke test)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    peak = None if args.tiny else peak_flops(name)
    report: dict[str, Any] = {"benchmark": "gpu_step_variants", "device": name, "torch": torch.__version__,
                              "tiny": args.tiny, "resolution": 64 if args.tiny else 512, "batch": 1, "lora_rank": 16,
                              "flop_per_step": FLOP_PER_STEP, "peak_bf16_flops": peak, "steps": args.steps}
    parts = {part.strip() for part in args.parts.split(",")}
    if "captured" in parts:
        changes = args.captured or (CAPTURED if args.device == "cuda" else CAPTURED[:2] + CAPTURED[-1:])
        for change in changes:
            options = {**BASE, **change}
            attempt(report, "captured", args, lambda o=options: captured_variant(args, o, peak), options)
        best = report["best_captured_options"] = best_options(report)
        if best != BASE and best not in [{k: r[k] for k in BASE} for r in report["captured"]]:
            attempt(report, "captured", args, lambda: captured_variant(args, best, peak), best)
    best = report.get("best_captured_options", dict(BASE))
    choices = [BASE, best] if best != BASE else [BASE]
    if "profile" in parts:
        for options in choices:
            attempt(report, "kernel_breakdown", args, lambda o=options: kernel_breakdown(args, o), options)
    if "compiled" in parts:
        for mode in args.compile_modes.split(","):
            for options in choices:
                attempt(report, "compiled", args, lambda o=options, m=mode: compiled_variant(args, o, peak, m),
                        {**options, "compile_mode": mode})
    write(args, report)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
