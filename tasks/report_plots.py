"""Report images drawn with PIL alone (no matplotlib): the training loss curve."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LOSS_CURVE_SIZE: tuple[int, int] = (640, 360)
"""Width and height of `loss_curve_png`'s image, in pixels."""

_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 64, 16, 28, 36
_TICKS = 5
_SMOOTHING = 0.9  # exponential moving average weight, as TensorBoard's default slider
_BACKGROUND, _AXIS, _GRID = (255, 255, 255), (60, 60, 60), (225, 225, 225)
_RAW, _SMOOTH = (170, 200, 235), (20, 90, 190)


def smooth(values: Sequence[float], weight: float = _SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
    smoothed: list[float] = []
    last, debias = 0.0, 0.0
    for value in values:
        last = last * weight + (1 - weight) * value
        debias = debias * weight + (1 - weight)
        smoothed.append(last / debias)
    return smoothed


def loss_curve_png(losses: Sequence[tuple[int, float]], dest: Path) -> Path:
    """Draw (step, loss) pairs as a PNG line chart at `dest`: the raw losses faint, the smoothed
    curve bold, with axes, step labels on x and loss labels on y."""
    points = [(int(step), float(loss)) for step, loss in losses if math.isfinite(loss)]
    if not points:
        raise ValueError("no finite loss values to plot")
    image = Image.new("RGB", LOSS_CURVE_SIZE, _BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    steps = [step for step, _ in points]
    values = [loss for _, loss in points]
    x_range = (min(steps), max(steps)) if max(steps) > min(steps) else _padded_range(steps[0], steps[0])
    y_range = _padded_range(min(values), max(values))
    _draw_axes(draw, font, x_range, y_range)
    to_pixel = _projection(x_range, y_range)
    _draw_line(draw, [to_pixel(s, v) for s, v in points], _RAW, 1)
    _draw_line(draw, [to_pixel(s, v) for s, v in zip(steps, smooth(values), strict=True)], _SMOOTH, 3)
    draw.text((_MARGIN_LEFT, 6), f"training loss (last {values[-1]:.4g})", fill=_AXIS, font=font)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    image.save(dest, format="PNG")
    return dest


def _padded_range(low: float, high: float) -> tuple[float, float]:
    if high == low:
        return low - 1, high + 1
    pad = (high - low) * 0.05
    return low - pad, high + pad


def _plot_box() -> tuple[int, int, int, int]:
    width, height = LOSS_CURVE_SIZE
    return _MARGIN_LEFT, _MARGIN_TOP, width - _MARGIN_RIGHT, height - _MARGIN_BOTTOM


def _projection(
    x_range: tuple[float, float], y_range: tuple[float, float]
) -> Callable[[float, float], tuple[float, float]]:
    left, top, right, bottom = _plot_box()

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_range[0]) / (x_range[1] - x_range[0]) * (right - left)
        py = bottom - (y - y_range[0]) / (y_range[1] - y_range[0]) * (bottom - top)
        return px, py

    return to_pixel


def _draw_axes(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
) -> None:
    left, top, right, bottom = _plot_box()
    to_pixel = _projection(x_range, y_range)
    for i in range(_TICKS):
        step = x_range[0] + (x_range[1] - x_range[0]) * i / (_TICKS - 1)
        loss = y_range[0] + (y_range[1] - y_range[0]) * i / (_TICKS - 1)
        x, _ = to_pixel(step, y_range[0])
        _, y = to_pixel(x_range[0], loss)
        draw.line([(x, top), (x, bottom)], fill=_GRID)
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.text((x, bottom + 6), f"{round(step)}", fill=_AXIS, font=font, anchor="ma")
        draw.text((left - 6, y), f"{loss:.3g}", fill=_AXIS, font=font, anchor="rm")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_AXIS, width=2)
    draw.text(((left + right) / 2, bottom + 20), "step", fill=_AXIS, font=font, anchor="ma")


def _draw_line(
    draw: ImageDraw.ImageDraw, pixels: list[tuple[float, float]], colour: tuple[int, int, int], width: int
) -> None:
    if len(pixels) == 1:
        x, y = pixels[0]
        draw.ellipse([(x - width - 1, y - width - 1), (x + width + 1, y + width + 1)], fill=colour)
    else:
        draw.line(pixels, fill=colour, width=width, joint="curve")
