"""The figures of the fault tests, kept in ``bench/results/faults.json`` (merged, one entry per case)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[1] / "bench"
RESULT = "faults"


def record(section: str, case: str, figures: dict[str, Any], load_before: list[float]) -> None:
    """Store ``figures`` as ``<section>.<case>``, keeping the other cases of earlier runs."""
    sys.path.insert(0, str(BENCH))
    try:
        from benchresults import RESULTS_DIR, write_result
    finally:
        sys.path.remove(str(BENCH))
    path = RESULTS_DIR / f"{RESULT}.json"
    document = json.loads(path.read_text()) if path.exists() else {}
    sections = {k: v for k, v in document.items() if k not in ("benchmark", "machine")}
    sections.setdefault(section, {})[case] = {key: round(v, 2) if isinstance(v, float) else v
                                              for key, v in figures.items()}
    write_result(RESULT, sections, load_before)
