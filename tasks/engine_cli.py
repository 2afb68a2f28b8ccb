"""The training engine as a command, for one job on several GPUs:

    accelerate launch --multi_gpu --num_processes 4 -m tasks.engine_cli job.json
    torchrun --standalone --nproc_per_node 4 -m tasks.engine_cli job.json   # the same, torch's launcher

(On CPUs, for tests: ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 ...`` uses gloo.)

``job.json`` holds ``{"config": {...TrainConfig...}, "images": [...], "captions": [...],
"output_dir": "..."}``; the main process writes ``<output_dir>/result.json`` (the TrainResult
and the number of processes that trained).
Each process trains on its own batches and gradients are averaged (see tasks/train_engine.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks.engine_config import TrainConfig
from tasks.train_engine import train

RESULT_FILE = "result.json"


def run_job(job_file: Path) -> Path | None:
    """Train the job described by ``job_file``; returns the result file on the main process."""
    from accelerate import PartialState

    job = json.loads(job_file.read_text())
    output_dir = Path(job["output_dir"])
    result = train(TrainConfig(**job["config"]), [Path(p) for p in job["images"]], job["captions"], output_dir)
    state = PartialState()
    if not state.is_main_process:
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {**result.model_dump(mode="json"), "processes": state.num_processes}
    (output_dir / RESULT_FILE).write_text(json.dumps(record, indent=2))
    return output_dir / RESULT_FILE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one dreamflow training job (under accelerate launch).")
    parser.add_argument("job", type=Path, help="JSON file with config, images, captions, output_dir")
    run_job(parser.parse_args(argv).job)


if __name__ == "__main__":
    main()
