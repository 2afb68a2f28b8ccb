"""GPU training benchmark: LoRA r16 on an SD-1.5-sized UNet at 512 px, batch 1, bf16.

The UNet is built from the published SD 1.5 UNet config (values below) with random weights, so
nothing is downloaded; inputs are random latents (1x4x64x64) and random text embeddings (1x77x768).
It reports ms/step after warm-up, peak memory, and MFU against 1.72 TFLOP per training step, for
eager vs torch.compile, with and without gradient checkpointing, into bench/results/gpu_train.json.

    python bench/gpu_train_bench.py                               # on a machine with an NVIDIA GPU
    python bench/gpu_train_bench.py --device cpu --steps 2 --tiny # smoke test of the code path

Without CUDA (and without `--device cpu`) it exits with status 2 and says why.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

FLOP_PER_STEP = 1.72e12
"""Forward + backward of the SD 1.5 UNet at 64x64 latents, batch 1 (LoRA adds little)."""

BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Dense bf16 peak by device-name fragment (SXM figures)."""

SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

TINY_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "sample_size": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
}

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant (compile happens here)")
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet (smoke test), not SD 1.5-sized")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "gpu_train.json")
    return parser.parse_args(argv)


def peak_flops(device_name: str) -> float | None:
    for fragment, flops in BF16_PEAK_FLOPS.items():
        if fragment in device_name:
            return flops
    return None


def build_unet(tiny: bool, device: str, dtype: Any, gradient_checkpointing: bool) -> Any:
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else SD15_UNET_CONFIG))
    unet.requires_grad_(False)
    unet.to(device, dtype=dtype)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def run_variant(args: argparse.Namespace, compiled: bool, gradient_checkpointing: bool) -> dict[str, Any]:
    import torch

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    unet = build_unet(args.tiny, args.device, dtype, gradient_checkpointing)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model = torch.compile(unet) if compiled else unet
    config = TINY_UNET_CONFIG if args.tiny else SD15_UNET_CONFIG
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

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    _sync(cuda)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(cuda)
    ms = (time.perf_counter() - started) * 1000 / args.steps
    result = {
        "compile": compiled,
        "gradient_checkpointing": gradient_checkpointing,
        "ms_per_step": round(ms, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "trainable_params": sum(p.numel() for p in params),
    }
    del model, unet, optimizer, params
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def _sync(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_train_bench: no CUDA device here; run it on a machine with an NVIDIA GPU "
              "(or use --device cpu --steps 2 --tiny for a smoke test)", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    peak = peak_flops(device_name)
    compile_options = [False] if args.no_compile or args.device == "cpu" else [False, True]
    variants = []
    for compiled in compile_options:
        for checkpointing in (False, True):
            result = run_variant(args, compiled, checkpointing)
            if peak and not args.tiny:
                result["mfu"] = round(FLOP_PER_STEP / (result["ms_per_step"] / 1000) / peak, 4)
            variants.append(result)
            print(json.dumps(result), flush=True)
    report = {
        "device": device_name, "torch": torch.__version__, "tiny": args.tiny, "resolution": (TINY_UNET_CONFIG if args.tiny else SD15_UNET_CONFIG)["sample_size"] * 8,
        "batch": 1, "precision": "bf16" if args.device == "cuda" else "fp32", "lora_rank": 16,
        "flop_per_step": FLOP_PER_STEP, "peak_bf16_flops": peak, "warmup": args.warmup, "steps": args.steps,
        "variants": variants,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
