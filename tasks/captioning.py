"""Per-image captions that always contain the instance prompt, cached in the store.

Plain module: no Prefect import. A captioner turns images into generated text; ``instance``
generates nothing (the caption is the instance prompt alone), ``blip`` runs a BLIP-family
captioning model from transformers, loaded on first use from a local folder or a hub id.
Generated text is cached under ``cache/captions/<captioner>/<model>/<sha256 of image>.txt``, so
a retraining on the same photos does not load or run the model again; the instance prompt is
added after the cache, so a new prompt reuses the cached text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from PIL import Image

from flows.store import ObjectNotFound, ObjectStore

if TYPE_CHECKING:
    from transformers import BlipForConditionalGeneration, BlipProcessor

CaptionerName = Literal["instance", "blip"]
CACHE_PREFIX = "cache/captions"
DEFAULT_BATCH_SIZE = 8


class CaptionModelUnavailable(RuntimeError):
    """The configured captioning model could not be loaded."""


class Captioner(Protocol):
    """Generates text for images; ``cache_namespace`` is None when there is nothing to cache."""

    @property
    def cache_namespace(self) -> str | None: ...

    def generate(self, images: Sequence[Path]) -> list[str]: ...


class InstanceCaptioner:
    """Generates nothing: every caption is the instance prompt alone."""

    cache_namespace: str | None = None

    def generate(self, images: Sequence[Path]) -> list[str]:
        """One empty string per image."""
        return ["" for _ in images]


class BlipCaptioner:
    """A BLIP captioning model (BlipForConditionalGeneration + BlipProcessor), loaded lazily."""

    def __init__(
        self, model: str, device: str | None = None, max_new_tokens: int = 30,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self.model_id = model
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.loads = 0  # how often the model was loaded (tests check cache hits with it)
        self._loaded: tuple[BlipProcessor, BlipForConditionalGeneration] | None = None

    @property
    def cache_namespace(self) -> str:
        """``blip/<short hash of the model id>``: one cache per model."""
        return f"blip/{hashlib.sha256(self.model_id.encode()).hexdigest()[:16]}"

    def _load(self) -> tuple[BlipProcessor, BlipForConditionalGeneration]:
        if self._loaded is None:
            import torch
            from transformers import BlipForConditionalGeneration, BlipProcessor

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
            try:
                processor = BlipProcessor.from_pretrained(self.model_id)
                model = BlipForConditionalGeneration.from_pretrained(self.model_id, dtype=dtype)
            except (OSError, ValueError) as exc:
                raise CaptionModelUnavailable(
                    f"caption model {self.model_id!r} could not be loaded (a local folder, or a hub "
                    f"id when online): {exc}"
                ) from exc
            self._loaded = (processor, model.to(device).eval())
            self.loads += 1
        return self._loaded

    def generate(self, images: Sequence[Path]) -> list[str]:
        """One generated caption per image, in batches."""
        if not images:
            return []
        processor, model = self._load()
        texts: list[str] = []
        for start in range(0, len(images), self.batch_size):
            texts += self._generate_batch(processor, model, images[start : start + self.batch_size])
        return texts

    def _generate_batch(
        self, processor: BlipProcessor, model: BlipForConditionalGeneration, paths: Sequence[Path]
    ) -> list[str]:
        import torch

        pictures = [_open_rgb(path) for path in paths]
        inputs = processor(images=pictures, return_tensors="pt").to(model.device, model.dtype)
        with torch.inference_mode():
            tokens = model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [text.strip() for text in processor.batch_decode(tokens, skip_special_tokens=True)]


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def make_captioner(name: CaptionerName, model: str, max_new_tokens: int = 30) -> Captioner:
    """The captioner called ``name`` (``model`` is used by ``blip`` only)."""
    if name == "instance":
        return InstanceCaptioner()
    if name == "blip":
        return BlipCaptioner(model, max_new_tokens=max_new_tokens)
    raise ValueError(f"unknown captioner {name!r}; expected 'instance' or 'blip'")


def with_instance_prompt(instance_prompt: str, generated: str) -> str:
    """The caption: the generated text led by the instance prompt (unless it already holds it)."""
    text = generated.strip()
    if not text:
        return instance_prompt
    if instance_prompt.lower() in text.lower():
        return text
    return f"{instance_prompt}, {text}"


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(namespace: str, image_sha256: str) -> str:
    """The store key of one cached generated caption."""
    return f"{CACHE_PREFIX}/{namespace}/{image_sha256}.txt"


@dataclass(frozen=True)
class CaptionOutcome:
    """The captions, in image order, and how many came from the cache."""

    captions: list[str]
    cached: int
    generated: int


def caption_images(
    paths: Sequence[Path], instance_prompt: str, captioner: Captioner, store: ObjectStore
) -> CaptionOutcome:
    """One caption per image containing ``instance_prompt``; generated text is cached in ``store``.

    Only the images whose text is not cached are given to the captioner, so a fully cached set
    never loads the model.
    """
    namespace = captioner.cache_namespace
    if namespace is None:
        texts = captioner.generate(paths)
        return CaptionOutcome([with_instance_prompt(instance_prompt, t) for t in texts], 0, 0)
    keys = [cache_key(namespace, file_sha256(Path(path))) for path in paths]
    texts_by_index: dict[int, str] = {}
    for index, key in enumerate(keys):
        try:
            texts_by_index[index] = store.get_bytes(key).decode("utf-8")
        except ObjectNotFound:
            continue
    missing = [index for index in range(len(paths)) if index not in texts_by_index]
    generated = captioner.generate([Path(paths[index]) for index in missing])
    for index, text in zip(missing, generated, strict=True):
        store.put_bytes(keys[index], text.encode("utf-8"), "text/plain; charset=utf-8")
        texts_by_index[index] = text
    captions = [with_instance_prompt(instance_prompt, texts_by_index[i]) for i in range(len(paths))]
    return CaptionOutcome(captions, len(paths) - len(missing), len(missing))
