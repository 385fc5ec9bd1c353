"""The report's figures as PNG bytes (matplotlib's Agg canvas; no pyplot, no global state).

Each function takes plain arrays and titles and states its settings (samples shown, sampler, NFE,
seed) in the figure itself; the report repeats them in the caption. PNGs carry no software or
time stamp, so the same inputs give the same bytes. Which stored numbers go into which figure is
decided in :mod:`workflows.report.gallery`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

DPI = 80
PANEL_INCHES = 3.0
_REFERENCE_COLOR = "#bbbbbb"


@dataclass(frozen=True)
class Series:
    """One model's points on the quality-vs-NFE plot, one per sampler."""

    label: str
    nfe: list[float]
    w2: list[float]
    distance: list[float]


@dataclass(frozen=True)
class Curve:
    """One training stage's logged loss against the step."""

    label: str
    step: np.ndarray
    loss: np.ndarray


@dataclass(frozen=True)
class Panel:
    """One small plot of 2D points: ``starts`` → ``ends`` pairs, paths, or points over ``background``."""

    title: str
    starts: np.ndarray | None = None
    ends: np.ndarray | None = None
    paths: tuple[np.ndarray, ...] = ()
    background: np.ndarray | None = None


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _grid(panels: int, columns: int, suptitle: str) -> tuple[Figure, list]:
    rows = max(1, math.ceil(panels / columns))
    columns = max(1, min(columns, panels))
    figure = Figure(figsize=(PANEL_INCHES * columns, PANEL_INCHES * rows + 0.6), layout="constrained")
    figure.suptitle(suptitle, fontsize=10)
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_axis_off()
    return figure, axes[:panels]


def quality_vs_nfe(series: list[Series], settings: str) -> bytes:
    """W2 to π1 and the distance to the reference solve against the NFE (log axis), a line per model."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    figure.suptitle(settings, fontsize=10)
    w2_axes, distance_axes = figure.subplots(1, 2)
    for item in series:
        order = np.argsort(item.nfe, kind="stable")
        nfe = np.asarray(item.nfe)[order]
        w2_axes.plot(nfe, np.asarray(item.w2)[order], marker="o", label=item.label)
        distance_axes.plot(nfe, np.asarray(item.distance)[order], marker="o", label=item.label)
    for axes, name in ((w2_axes, "W2 to π1"), (distance_axes, "E‖Z1 − Z1 of the reference solve‖")):
        axes.set_xscale("log")
        axes.set_xlabel("NFE per sample (mean)")
        axes.set_ylabel(name)
        axes.grid(True, alpha=0.3)
    w2_axes.legend(fontsize=8)
    return _png(figure)


def loss_curves(curves: list[Curve], settings: str) -> bytes:
    """The training loss against the step, a line per training stage, on a log y axis (steps
    where the loss is not positive are left out: a log axis cannot show them)."""
    figure = Figure(figsize=(8, 4.2), layout="constrained")
    figure.suptitle(settings, fontsize=10)
    axes = figure.subplots()
    for curve in curves:
        shown = np.isfinite(curve.loss) & (curve.loss > 0)
        axes.plot(curve.step[shown], curve.loss[shown], linewidth=1.0, label=curve.label)
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def _pairs(axes, panel: Panel) -> None:
    """Segments Z0 → Z1 coloured by the height of Z0, so crossings show as mixed colours."""
    segments = np.stack([panel.starts, panel.ends], axis=1)
    heights = panel.starts[:, 1]
    span = np.ptp(heights) or 1.0
    lines = LineCollection(segments, cmap="viridis", linewidths=0.6, alpha=0.7)
    lines.set_array((heights - heights.min()) / span)
    axes.add_collection(lines)
    axes.scatter(*panel.starts.T, s=3, color="#1f77b4")
    axes.scatter(*panel.ends.T, s=3, color="#d62728")
    axes.autoscale()


def _paths(axes, panel: Panel) -> None:
    for path in panel.paths:
        axes.plot(path[:, 0], path[:, 1], linewidth=0.7, alpha=0.8)
    if panel.paths:
        axes.scatter([p[0, 0] for p in panel.paths], [p[0, 1] for p in panel.paths], s=6, color="#1f77b4", zorder=3)
        axes.scatter([p[-1, 0] for p in panel.paths], [p[-1, 1] for p in panel.paths], s=6, color="#d62728", zorder=3)


def _points(axes, panel: Panel) -> None:
    if panel.background is not None:
        axes.scatter(*panel.background.T, s=2, color=_REFERENCE_COLOR, label="π1")
    axes.scatter(*panel.ends.T, s=2, color="#d62728", label="samples")


def panels(items: list[Panel], settings: str, columns: int = 4) -> bytes:
    """A grid of 2D panels: pair segments when a panel has starts, else paths when it has
    paths, else points over a π1 background."""
    figure, axes_list = _grid(len(items), columns, settings)
    for axes, panel in zip(axes_list, items):
        if panel.starts is not None:
            _pairs(axes, panel)
        elif panel.paths:
            _paths(axes, panel)
        else:
            _points(axes, panel)
        axes.set_title(panel.title, fontsize=8)
        axes.set_aspect("equal", adjustable="datalim")
        axes.tick_params(labelsize=7)
    return _png(figure)


def tile(images: np.ndarray, columns: int) -> np.ndarray:
    """(n, C, H, W) images in [−1, 1] as one (rows·H, columns·W, C) array in [0, 1], one pixel
    of white between images."""
    n, channels, height, width = images.shape
    rows = max(1, math.ceil(n / columns))
    canvas = np.ones((rows * (height + 1) - 1, columns * (width + 1) - 1, channels))
    for index, image in enumerate(np.clip((images + 1.0) / 2.0, 0.0, 1.0)):
        top, left = (index // columns) * (height + 1), (index % columns) * (width + 1)
        canvas[top : top + height, left : left + width] = image.transpose(1, 2, 0)
    return canvas


def image_grids(items: list[tuple[str, np.ndarray]], settings: str, columns: int) -> bytes:
    """A grid of panels, each a titled tile of images (n, C, H, W) in [−1, 1]."""
    figure, axes_list = _grid(len(items), columns, settings)
    for axes, (title, images) in zip(axes_list, items):
        side = max(1, math.ceil(math.sqrt(len(images))))
        canvas = tile(images, side)
        axes.imshow(
            canvas[..., 0] if canvas.shape[-1] == 1 else canvas,
            cmap="gray",
            vmin=0.0,
            vmax=1.0,
            interpolation="nearest",
        )
        axes.set_title(title, fontsize=8)
        axes.set_axis_off()
    return _png(figure)
