"""Stage 5: convert the trained LoRA to the formats people load."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from flows.params import TrainingParams, TrainingStatus
from tasks.context import report_stage, workdir
from tasks.train import TrainOutput

KOHYA_BASE_VERSION = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@task(name="convert-lora")
def convert_lora(params: TrainingParams, trained: TrainOutput) -> dict[str, str]:
    """Export the diffusers LoRA and its kohya/A1111/ComfyUI twin; returns name -> local path."""
    from tasks.kohya import save_kohya_lora

    report_stage(params.training_id, TrainingStatus.COMPRESSING, "converting", "converting to diffusers and kohya formats")
    export_dir = workdir(params.training_id, "export")
    kohya = save_kohya_lora(
        Path(trained.lora_file), export_dir / f"{params.training_id}.safetensors",
        alpha=trained.alpha, rank=trained.rank, base_model=params.base_model_id, family=trained.family,
        extra_metadata={"ss_training_comment": params.instance_prompt, "ss_steps": str(trained.steps)},
    )
    return {"lora_diffusers": trained.lora_file, "lora_kohya": str(kohya)}
