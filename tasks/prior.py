"""Class images for prior preservation, generated once per (base model, class prompt, resolution, count).

They live in the object store under `<prefix>/<sha256 of that tuple>/NN.png`, with a
`manifest.json` written last: a cache entry without a manifest is incomplete and is regenerated.
The seed is not part of the key, so jobs with different seeds share one set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tasks import sampling

if TYPE_CHECKING:
    from flows.store import ObjectStore

logger = logging.getLogger(__name__)

CLASS_IMAGE_PREFIX = "cache/class_images"
MANIFEST = "manifest.json"
GENERATION_BATCH = 4
GENERATION_STEPS = 25

DEFAULT_CLASS_PROMPTS = {"person": "a photo of a person", "man": "a photo of a man", "woman": "a photo of a woman"}


def default_class_prompt(training_type: str | None) -> str:
    """The class prompt for a training type (person, man, woman; anything else is an object)."""
    return DEFAULT_CLASS_PROMPTS.get(training_type or "", "a photo of an object")


def class_cache_key(pretrained: str, family: str, class_prompt: str, resolution: int, count: int) -> str:
    """The cache folder's name: sha256 of the tuple that decides what the images look like."""
    identity = json.dumps([pretrained, family, class_prompt, resolution, count])
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def ensure_class_images(
    store: ObjectStore,
    pretrained: str,
    family: str,
    class_prompt: str,
    resolution: int,
    count: int,
    seed: int,
    work_dir: Path,
    prefix: str = CLASS_IMAGE_PREFIX,
    steps: int = GENERATION_STEPS,
) -> list[Path]:
    """Local copies (in `work_dir`) of the class images, generated with the base model on a cache miss."""
    folder = f"{prefix.rstrip('/')}/{class_cache_key(pretrained, family, class_prompt, resolution, count)}"
    work_dir.mkdir(parents=True, exist_ok=True)
    if store.exists(f"{folder}/{MANIFEST}"):
        names = json.loads(store.get_bytes(f"{folder}/{MANIFEST}"))["images"]
        logger.info("class images for %r: %d from the cache at %s", class_prompt, len(names), folder)
        return [store.get_file(f"{folder}/{name}", work_dir / name) for name in names]
    paths = _generate(pretrained, family, class_prompt, resolution, count, seed, work_dir, steps)
    for path in paths:
        store.put_file(f"{folder}/{path.name}", path, content_type="image/png")
    manifest = {"pretrained": pretrained, "family": family, "class_prompt": class_prompt,
                "resolution": resolution, "images": [path.name for path in paths]}
    store.put_bytes(f"{folder}/{MANIFEST}", json.dumps(manifest).encode(), content_type="application/json")
    return paths


def _generate(
    pretrained: str, family: str, class_prompt: str, resolution: int, count: int, seed: int, work_dir: Path,
    steps: int,
) -> list[Path]:
    logger.info("generating %d class images for %r with %s", count, class_prompt, pretrained)
    pipe = sampling.load_pipeline(pretrained, family=family)
    paths: list[Path] = []
    try:
        while len(paths) < count:
            batch = min(GENERATION_BATCH, count - len(paths))
            images = sampling.render(pipe, class_prompt, None, batch, seed + len(paths), resolution, steps)
            for image in images:
                path = work_dir / f"{len(paths):02d}.png"
                image.save(path)
                paths.append(path)
    finally:
        del pipe
    return paths
