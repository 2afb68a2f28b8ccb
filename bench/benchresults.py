"""What every dreamflow benchmark writes: its figures plus the machine they were taken on, as JSON.

The development machine is shared (2 cores, other developers, a test suite), so each result
carries the load average before and after the run, and says so.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MACHINE_KEYS = ("cpu_count", "torch_threads", "load_average_before", "load_average_after", "timestamp",
                "platform", "python", "torch", "shared_machine", "note")
SHARED_NOTE = ("taken on a shared development machine (other developers and a test suite run beside it); "
               "compare figures from one run with each other, not across runs")


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(value, 2) for value in os.getloadavg()]


def machine_info(load_before: list[float]) -> dict[str, Any]:
    """CPU count, torch threads, load before/after, timestamp and versions."""
    try:
        import torch

        threads, version = torch.get_num_threads(), torch.__version__
    except ImportError:
        threads, version = None, None
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version,
        "shared_machine": True,
        "note": SHARED_NOTE,
    }


def write_result(name: str, figures: dict[str, Any], load_before: list[float],
                 results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``{"benchmark", "machine", **figures}`` to ``<results_dir>/<name>.json`` and return the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    document = {"benchmark": name, "machine": machine_info(load_before), **figures}
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path

