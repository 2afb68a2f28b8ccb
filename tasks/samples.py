"""Stage 7: sample images from the trained model."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from flows.params import TrainingParams
from tasks.context import workdir
from tasks.registration import timed_stage
from tasks.train import TrainOutput


@task(name="make-samples")
@timed_stage
def make_samples(params: TrainingParams, trained: TrainOutput) -> dict[str, str]:
    """Sample images with the instance prompt, their grid and the loss curve; returns name -> local PNG path.

    It runs while the weights are converted and stored; the flow reports its status once those end."""
    from tasks.report_plots import loss_curve_png
    from tasks.resident import take_trained
    from tasks.sampling import generate_samples, make_grid

    trained_unet = take_trained(params.training_id)  # taken in any case: nothing else needs it after this
    dest = workdir(params.training_id, "samples")
    pictures = {"loss_curve": str(loss_curve_png(trained.losses, dest / "loss_curve.png"))}
    if params.sample_count == 0:
        return pictures
    full_model = trained.method == "dreambooth"
    paths = generate_samples(
        trained.weights if full_model else trained.pretrained, None if full_model else Path(trained.weights),
        params.instance_prompt, params.negative_prompt, params.sample_count, params.seed, trained.resolution,
        dest, steps=params.sample_steps, family=trained.family,
        unet=None if full_model else trained_unet,
    )
    grid = make_grid(paths, dest / "grid.png")
    return {**pictures, "grid": str(grid), **{f"sample_{i}": str(p) for i, p in enumerate(paths)}}
