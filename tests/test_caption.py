"""tasks.captioning: the instance prompt in every caption, the BLIP code path, the caption cache.

The BLIP model here is a tiny, randomly initialised BlipForConditionalGeneration built offline
from a small BlipConfig, with a BertTokenizer over a vocabulary written in this file. It proves
the code path (load from a folder, batched generation, decoding, caching), not caption quality:
its captions are random words.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from flows.store_local import LocalStore
from tasks.captioning import (
    BlipCaptioner,
    CaptionModelUnavailable,
    InstanceCaptioner,
    cache_key,
    caption_images,
    file_sha256,
    make_captioner,
    with_instance_prompt,
)

PROMPT = "photo of sks person"
WORDS = ["a", "man", "woman", "person", "wearing", "red", "blue", "shirt", "smiling", "in", "front", "of", "wall"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_blip(folder: Path) -> Path:
    """Save a random tiny BLIP captioning model and its processor to ``folder``."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    tokenizer = BertTokenizer(str(vocab), do_lower_case=True)
    size = len(SPECIAL) + len(WORDS)
    ids = {"pad_token_id": 0, "bos_token_id": 2, "sep_token_id": 3, "eos_token_id": 3}
    config = BlipConfig(
        text_config={"vocab_size": size, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 37, "max_position_embeddings": 64, "encoder_hidden_size": 32, **ids},
        vision_config={"hidden_size": 32, "image_size": 32, "patch_size": 8, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 37},
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():  # random weights end at once; make special tokens unlikely so words come out
        model.text_decoder.cls.predictions.bias[: len(SPECIAL)] = -100.0
    model.save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", "http://127.0.0.1:8000", b"test-secret")


@pytest.fixture
def crops(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "crops"
    folder.mkdir()
    paths = []
    for index, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        path = folder / f"{index:02d}.png"
        Image.new("RGB", (48, 48), colour).save(path)
        paths.append(path)
    return paths


def test_the_instance_prompt_is_always_in_the_caption() -> None:
    assert with_instance_prompt(PROMPT, "") == PROMPT
    assert with_instance_prompt(PROMPT, "  a man smiling ") == f"{PROMPT}, a man smiling"
    assert with_instance_prompt(PROMPT, f"a {PROMPT} smiling") == f"a {PROMPT} smiling"


def test_instance_captioner_needs_no_model_and_no_cache(crops: list[Path], store: LocalStore) -> None:
    outcome = caption_images(crops, PROMPT, make_captioner("instance", "unused"), store)
    assert outcome.captions == [PROMPT] * 3
    assert (outcome.cached, outcome.generated) == (0, 0)
    assert store.list("cache/") == []
    assert isinstance(make_captioner("instance", "x"), InstanceCaptioner)
    with pytest.raises(ValueError, match="unknown captioner"):
        make_captioner("clip", "x")  # type: ignore[arg-type]


def test_blip_captions_are_generated_then_read_from_the_cache(
    tmp_path: Path, crops: list[Path], store: LocalStore
) -> None:
    model_dir = build_tiny_blip(tmp_path / "tiny-blip")
    first = BlipCaptioner(str(model_dir), device="cpu", max_new_tokens=6, batch_size=2)
    outcome = caption_images(crops, PROMPT, first, store)
    assert first.loads == 1 and (outcome.cached, outcome.generated) == (0, 3)
    assert all(caption.startswith(f"{PROMPT}, ") for caption in outcome.captions), outcome.captions
    for path, caption in zip(crops, outcome.captions, strict=True):
        generated = caption.removeprefix(f"{PROMPT}, ")
        assert generated and set(generated.split()) <= set(WORDS), caption  # random words of the vocab
        key = cache_key(first.cache_namespace, file_sha256(path))
        assert key.startswith("cache/captions/blip/")
        assert store.get_bytes(key).decode() == generated

    # The model folder is gone: only cache hits can answer, and the new captioner never loads.
    shutil.rmtree(model_dir)
    second = BlipCaptioner(str(model_dir), device="cpu")
    again = caption_images(crops, "photo of zwx person", second, store)
    assert second.loads == 0 and (again.cached, again.generated) == (3, 0)
    assert again.captions == [c.replace(PROMPT, "photo of zwx person") for c in outcome.captions]

    # A new image is a cache miss, and the missing model is reported clearly.
    extra = tmp_path / "extra.png"
    Image.new("RGB", (48, 48), (90, 90, 90)).save(extra)
    with pytest.raises(CaptionModelUnavailable, match="tiny-blip"):
        caption_images([*crops, extra], PROMPT, second, store)
