"""What the crop stage kept and dropped: report rows, a one-line summary, a markdown table and a
contact sheet of the crops.

Plain module: no Prefect import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tasks.dedupe import Duplicate
from tasks.faces import CropResult

THUMB_SIDE = 160
LABEL_HEIGHT = 18
COLUMNS = 6
KEPT_COLOUR = (235, 235, 235)
DROPPED_COLOUR = (230, 60, 60)


@dataclass(frozen=True)
class ReportRow:
    """One source image: its crop (if any), whether it was kept, and why not."""

    source: str
    crop: str | None
    kept: bool
    reason: str | None

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return asdict(self)


def report_rows(results: Sequence[CropResult], duplicates: Sequence[Duplicate]) -> list[ReportRow]:
    """One row per source image, in input order; duplicates keep their crop for the sheet."""
    by_crop = {duplicate.path: duplicate for duplicate in duplicates}
    rows = []
    for result in results:
        duplicate = by_crop.get(result.path) if result.path is not None else None
        crop = result.path.name if result.path is not None else None
        if duplicate is not None:
            rows.append(ReportRow(result.source.name, crop, False, _source_reason(duplicate, results)))
        else:
            rows.append(ReportRow(result.source.name, crop, result.kept, result.reason))
    return rows


def _source_reason(duplicate: Duplicate, results: Sequence[CropResult]) -> str:
    """The duplicate's reason, naming the source image (not the crop) it duplicates."""
    sources = {r.path: r.source.name for r in results if r.path is not None}
    original = sources.get(duplicate.duplicate_of, duplicate.duplicate_of.name)
    return f"near-duplicate of {original} (hash distance {duplicate.distance})"


def summary_line(rows: Sequence[ReportRow]) -> str:
    """E.g. ``kept 5 of 6 images; dropped 01.jpg: no face found``."""
    kept = sum(row.kept for row in rows)
    line = f"kept {kept} of {len(rows)} images"
    dropped = [f"{row.source}: {row.reason}" for row in rows if not row.kept]
    return f"{line}; dropped {'; '.join(dropped)}" if dropped else line


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def markdown_report(rows: Sequence[ReportRow], sheet_url: str | None = None) -> str:
    """A markdown table of every source image with the crop and reason, and the sheet."""
    lines = [f"### Face crops: {summary_line(rows).split(';')[0]}", ""]
    if sheet_url:
        lines += [f"![contact sheet]({sheet_url})", ""]
    lines += ["| image | crop | kept | reason |", "|---|---|---|---|"]
    for row in rows:
        kept = "yes" if row.kept else "**no**"
        lines.append(f"| {_cell(row.source)} | {_cell(row.crop)} | {kept} | {_cell(row.reason)} |")
    return "\n".join(lines) + "\n"


def _label(row: ReportRow) -> str:
    return row.source if row.kept else f"x {row.source}: {row.reason}"


def contact_sheet(rows: Sequence[ReportRow], crop_dir: Path, columns: int = COLUMNS) -> Image.Image:
    """A grid of the crops (kept and duplicate-dropped) with their source names below them.

    Dropped crops get a red frame and their reason in red. Rows without a crop are left out.
    """
    shown = [row for row in rows if row.crop is not None]
    columns = max(1, min(columns, len(shown)))
    grid_rows = max(1, -(-len(shown) // columns))
    cell_h = THUMB_SIDE + LABEL_HEIGHT
    sheet = Image.new("RGB", (columns * THUMB_SIDE, grid_rows * cell_h), (30, 30, 30))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for position, row in enumerate(shown):
        left, top = (position % columns) * THUMB_SIDE, (position // columns) * cell_h
        with Image.open(crop_dir / str(row.crop)) as crop:
            thumb = crop.convert("RGB").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
        sheet.paste(thumb, (left, top))
        colour = KEPT_COLOUR if row.kept else DROPPED_COLOUR
        if not row.kept:
            draw.rectangle((left, top, left + THUMB_SIDE - 1, top + THUMB_SIDE - 1), outline=colour, width=3)
        draw.text((left + 3, top + THUMB_SIDE + 3), _label(row)[:28], fill=colour, font=font)
    return sheet
