"""Stage 7: sample images from the trained model."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from flows.params import TrainingParams, TrainingStatus
from tasks.context import report_stage, workdir
from tasks.train import TrainOutput


@task(name="make-samples")
def make_samples(params: TrainingParams, trained: TrainOutput) -> dict[str, str]:
    """Generate ``sample_count`` images with the instance prompt; returns name -> local PNG path."""
    from tasks.sampling import generate_samples, make_grid

    report_stage(params.training_id, TrainingStatus.DEPLOYING_MODEL, "sampling", "generating sample images")
    if params.sample_count == 0:
        return {}
    dest = workdir(params.training_id, "samples")
    paths = generate_samples(
        trained.pretrained, Path(trained.lora_file), params.instance_prompt, params.negative_prompt,
        params.sample_count, params.seed, trained.resolution, dest, steps=params.sample_steps,
    )
    grid = make_grid(paths, dest / "grid.png")
    return {"grid": str(grid), **{f"sample_{i}": str(p) for i, p in enumerate(paths)}}
