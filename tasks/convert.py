"""Stage 5: convert the trained weights to the formats people load.

LoRA: diffusers file + kohya/A1111/ComfyUI file. LyCORIS (LoHa/LoKr): the peft adapter file
(``lycoris_peft``) + the A1111/ComfyUI LyCORIS layout (``lora_kohya``). DreamBooth: a single-file LDM checkpoint + the diffusers folder (zip).
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

from prefect import task

from flows.params import TrainingParams, TrainingStatus
from tasks.context import report_stage, workdir
from tasks.registration import timed_stage
from tasks.train import TrainOutput


def kohya_lora(params: TrainingParams, trained: TrainOutput, export_dir: Path) -> dict[str, str]:
    from tasks.kohya import save_kohya_lora

    kohya = save_kohya_lora(
        Path(trained.weights), export_dir / f"{params.training_id}.safetensors",
        alpha=trained.alpha, rank=trained.rank, base_model=params.base_model_id, family=trained.family,
        extra_metadata={"ss_training_comment": params.instance_prompt, "ss_steps": str(trained.steps)},
    )
    return {"lora_diffusers": trained.weights, "lora_kohya": str(kohya)}


def lycoris(params: TrainingParams, trained: TrainOutput, export_dir: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    from tasks.lycoris_export import save_lycoris

    exported = save_lycoris(
        load_file(trained.weights), export_dir / f"{params.training_id}.safetensors", method=trained.method,
        alpha=trained.alpha, rank=trained.rank, base_model=params.base_model_id, family=trained.family,
        extra_metadata={"ss_training_comment": params.instance_prompt, "ss_steps": str(trained.steps)},
    )
    # diffusers reads no LoHa/LoKr file: the peft file is named for what loads it
    return {"lycoris_peft": trained.weights, "lora_kohya": str(exported)}


def zip_folder(folder: Path, dest: Path) -> Path:
    """The folder as one zip (stored: safetensors do not compress), written beside and then renamed."""
    partial = dest.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    shutil.move(partial, dest)
    return dest


def half_folder(folder: Path, dest: Path) -> Path:
    """A copy of a diffusers folder whose floating-point weights are fp16 (configs and tokenizers as they are)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(folder.rglob("*")):
        target = dest / path.relative_to(folder)
        if path.is_dir():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix != ".safetensors":
            shutil.copy2(path, target)
            continue
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata()
        save_file({key: value.to(torch.float16) if value.is_floating_point() else value
                   for key, value in tensors.items()}, str(target), metadata=metadata)
    return dest


def name_base_model_by_id(folder: Path, base_model_id: str) -> None:
    """The folder's configs name the base model by its registry id, not by the server folder it was
    read from (diffusers writes that path as ``_name_or_path``; it means nothing to a user)."""
    for path in folder.rglob("*.json"):
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(config, dict) and "_name_or_path" in config:
            config["_name_or_path"] = base_model_id
            partial = path.with_name(f".{path.name}.partial")  # the samples may be reading the folder meanwhile
            partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(partial, path)


def dreambooth(params: TrainingParams, trained: TrainOutput, export_dir: Path) -> dict[str, str]:
    from tasks.single_file import save_single_file

    checkpoint = save_single_file(Path(trained.weights), export_dir / f"{params.training_id}.safetensors",
                                  family=trained.family, half=params.half_precision)
    pipeline = Path(trained.weights)
    if params.half_precision:
        pipeline = half_folder(pipeline, export_dir / "diffusers-fp16")
    name_base_model_by_id(pipeline, params.base_model_id)
    folder = zip_folder(pipeline, export_dir / f"{params.training_id}-diffusers.zip")
    if params.half_precision:
        shutil.rmtree(pipeline, ignore_errors=True)
    return {"checkpoint": str(checkpoint), "diffusers": str(folder)}


EXPORTERS = {"lora": kohya_lora, "loha": lycoris, "lokr": lycoris, "dreambooth": dreambooth}


@task(name="convert-weights")
@timed_stage
def convert_weights(params: TrainingParams, trained: TrainOutput) -> dict[str, str]:
    """Export the trained weights in every format of its method; returns link name -> local path."""
    report_stage(params.training_id, TrainingStatus.COMPRESSING, "converting",
                 f"converting the {trained.method} weights to the export formats")
    return EXPORTERS[trained.method](params, trained, workdir(params.training_id, "export"))
