"""The SDXL path on `tiny-sdxl`: two text encoders, pooled embeddings, added time ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from engine_fixtures import PROMPT, config_for, one_torch_thread, subject  # noqa: F401
from tasks.engine_data import read_pixels
from tasks.sampling import generate_samples, lora_output_difference
from tasks.tiny_models import TINY_SDXL_RESOLUTION, build_tiny_sdxl
from tasks.train_engine import train


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def test_tiny_sdxl_has_two_encoders_and_a_text_time_unet(tiny_sdxl: Path) -> None:
    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    unet = json.loads((tiny_sdxl / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and unet["cross_attention_dim"] == 32 + 48
    # the second encoder is wider than the first, as SDXL's are: diffusers' single-file loader goes by width
    widths = [json.loads((tiny_sdxl / name / "config.json").read_text())["hidden_size"]
              for name in ("text_encoder", "text_encoder_2")]
    assert widths == [32, 48]


def test_crop_geometry_feeds_the_time_ids(subject: list[Path]) -> None:
    pixels = read_pixels(subject, 64)
    crops = pixels.crops
    assert pixels.batch.shape == (2, 3, 64, 64)
    assert crops[0].original_size == (512, 512) and crops[0].top_left == (0, 0)
    assert crops[1].original_size == (200, 300) and crops[1].top_left == (0, 16)  # 96x64, centre-cropped


def test_sdxl_lora_trains_loads_and_samples(tiny_sdxl: Path, subject: list[Path], tmp_path: Path) -> None:
    config = config_for(tiny_sdxl, family="sdxl", resolution=TINY_SDXL_RESOLUTION, max_train_steps=10,
                        report_every=5)
    kept: list = []
    result = train(config, subject, [PROMPT] * 2, tmp_path / "lora", keep_trained=kept.append)
    weights = load_file(result.adapter_file)
    assert weights and all(key.startswith("unet.") and ".lora_" in key for key in weights)
    assert any(".attn2.to_k." in key for key in weights)  # the cross-attention over both encoders

    assert lora_output_difference(str(tiny_sdxl), result.adapter_file, PROMPT, 0, 64, steps=3) > 2.0
    paths = generate_samples(str(tiny_sdxl), result.adapter_file, PROMPT, "blurry", count=1, seed=3,
                             resolution=64, dest_dir=tmp_path / "samples", steps=2)
    image = np.asarray(Image.open(paths[0]))
    assert image.shape == (64, 64, 3) and image.std() > 0
    handed = generate_samples(str(tiny_sdxl), result.adapter_file, PROMPT, "blurry", count=1, seed=3,
                              resolution=64, dest_dir=tmp_path / "handed", steps=2, unet=kept[0])
    assert np.abs(np.asarray(Image.open(handed[0]), dtype=np.int16) - image.astype(np.int16)).max() <= 1


def test_the_sdxl_single_file_checkpoint_loads_in_diffusers_as_the_folder(tiny_sdxl: Path, tmp_path: Path) -> None:
    """What a DreamBooth SDXL training exports as `checkpoint`, loaded the way its users load it."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from tasks.single_file import save_single_file

    path = save_single_file(tiny_sdxl, tmp_path / "tiny-sdxl.safetensors", family="sdxl")
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl), local_files_only=True)
    folder = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(folder, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name

    def render(p: StableDiffusionXLPipeline) -> np.ndarray:
        out = p(PROMPT, num_inference_steps=2, height=TINY_SDXL_RESOLUTION, width=TINY_SDXL_RESOLUTION,
                generator=torch.Generator().manual_seed(0), output_type="np")
        return np.asarray(out.images[0], dtype=np.float32)

    assert np.abs(render(pipe) - render(folder)).max() < 1e-5
