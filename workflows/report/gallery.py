"""The report's figures, chosen from the stored results: which samples, paths and curves each
figure shows, with the settings they were made under (the drawing is :mod:`workflows.report.figures`).

- quality against NFE, a line per model (always, once an evaluation finished);
- loss curves, a line per training stage (when training metrics were logged);
- images: sample grids, a row per model, a column per sampler;
- 2D data: the pairs (Z0, Z1) of every model's coupling, its paths Z_t, its samples per sampler
  and, when a distilled model was evaluated with ``euler@1``, the one-step samples side by side;
  beside the straight-paths grid (:mod:`workflows.report.paper`), its samples: a row per path, a
  column per Euler N.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workflows.eval_files import INDEPENDENT, column_array
from workflows.report.blocks import Image
from workflows.report.figures import Curve, Panel, Series, image_grids, loss_curves, panels, quality_vs_nfe
from workflows.report.paper import euler_steps, path_flows, path_label
from workflows.report.read import Evaluation, RunResults
from workflows.report.tables import number

PAIR_LINES = 200
"""Pairs drawn per model in the pairs figure."""
GRID_IMAGES = 16
"""Images per panel of the sample grids."""


def _rows_of(table: pa.Table, sampler: str) -> pa.Table:
    return table.filter(pc.equal(table["sampler"], sampler))


def _vectors_of(table: pa.Table, sampler: str, column: str) -> np.ndarray:
    """Column ``column`` of the rows of ``sampler`` as an array (rows, size)."""
    return column_array(_rows_of(table, sampler), column)


def _paths_of(table: pa.Table, sampler: str) -> tuple[np.ndarray, ...]:
    rows = _rows_of(table, sampler)
    ids, states = rows["id"].to_numpy(), column_array(rows, "x")
    return tuple(states[ids == sample] for sample in np.unique(ids))


def _densest_sampler(table: pa.Table) -> str | None:
    """The sampler with the most stored states per path (euler@100 by default)."""
    names = table["sampler"].to_pylist()
    counts = {name: names.count(name) for name in dict.fromkeys(names)}
    return max(counts, key=lambda name: counts[name]) if counts else None


def _settings(evaluation: Evaluation, shown: str) -> str:
    return f"{shown} of {evaluation.config.get('samples')} samples per model, seed {evaluation.config.get('seed')}"


def _pairs_of(evaluation: Evaluation, sampler: str) -> tuple[np.ndarray, np.ndarray]:
    """The first :data:`PAIR_LINES` stored pairs (Z0, Z1) of ``sampler``."""
    return tuple(_vectors_of(evaluation.samples, sampler, column)[:PAIR_LINES] for column in ("x0", "x1"))


def quality_figure(results: RunResults) -> Image:
    first = results.evaluations[0]
    series = [
        Series(e.label, *([row[key] for row in e.rows()] for key in ("nfe_mean", "w2", "one_step_distance")))
        for e in results.evaluations
    ]
    settings = _settings(first, f"all samplers, W2 on the first {first.config.get('ot_samples')}")
    return Image("figure-quality-vs-nfe.png", quality_vs_nfe(series, settings), f"Quality against NFE — {settings}.")


def loss_figure(results: RunResults) -> Image | None:
    """The loss against the step of every training stage that logged metrics; None when none did."""
    if not results.curves:
        return None
    curves = []
    for curve in results.curves:
        label = results.model_label(curve.stage.name)
        curves.append(
            Curve(
                f"{curve.stage.name} ({label})" if label else curve.stage.name,
                curve.column("step"),
                curve.column("loss"),
            )
        )
    settings = "training loss per logged step (for a resumed stage, each step as its latest attempt logged it)"
    return Image("figure-loss.png", loss_curves(curves, settings), f"Loss curves — {settings}; log scale.")


def pairs_figure(results: RunResults) -> Image:
    """Segments Z0 → Z1 of the independent pairs, then of each model's coupling (the seed figure:
    crossings untangling from 1-RF to 2-RF)."""
    first = results.evaluations[0]
    crossing = number((first.details.get("independent") or {}).get("crossing_pct"), ".2f")
    items = [Panel(f"independent pairs (Z0, X1 ~ π1)\ncrossing {crossing} %", *_pairs_of(first, INDEPENDENT))]
    for evaluation in results.evaluations:
        row = evaluation.coupling_row()
        title = (
            f"{evaluation.label}\n{row['sampler']} · NFE {row['nfe_mean']:.1f} · "
            f"crossing {number(row['crossing_pct'], '.2f')} %"
        )
        items.append(Panel(title, *_pairs_of(evaluation, row["sampler"])))
    settings = _settings(first, f"pairs (Z0, Z1) of the reference solve: the first {len(items[0].starts)}")
    caption = f"Pairs of each model's coupling, coloured by the height of Z0 — {settings}."
    return Image("figure-pairs.png", panels(items, settings), caption)


def paths_figure(results: RunResults) -> Image | None:
    """Each model's stored paths Z_t of its densest sampler; None when no paths were kept."""
    items = []
    for evaluation in results.evaluations:
        densest = _densest_sampler(evaluation.trajectories)
        if densest is not None:
            paths = _paths_of(evaluation.trajectories, densest)
            items.append(Panel(f"{evaluation.label}\n{densest} · {len(paths)} paths", paths=paths))
    if not items:
        return None
    first = results.evaluations[0]
    settings = _settings(first, f"paths Z_t of the finest sampler: the first {first.config.get('trajectories')}")
    return Image("figure-trajectories.png", panels(items, settings), f"Paths of each model — {settings}.")


def samples_figure(results: RunResults) -> Image:
    """A row per model, a column per sampler: Z1 over π1's reference sample."""
    items = []
    for evaluation in results.evaluations:
        reference = _vectors_of(evaluation.samples, INDEPENDENT, "x1")
        for row in evaluation.rows():
            title = f"{evaluation.label}\n{row['sampler']} · NFE {row['nfe_mean']:.1f} · W2 {number(row['w2'], '.3g')}"
            items.append(Panel(title, ends=_vectors_of(evaluation.samples, row["sampler"], "x1"), background=reference))
    first = results.evaluations[0]
    shown = len(_vectors_of(first.samples, INDEPENDENT, "x1"))
    settings = _settings(first, f"Z1 per sampler (grey: π1): the first {shown}")
    figure = panels(items, settings, columns=len(first.rows()))
    return Image("figure-samples.png", figure, f"Samples by sampler — {settings}.")


def one_step_figure(results: RunResults) -> Image | None:
    """Distillation versus reflow: every model's one-step (euler@1) samples side by side with their
    W2 to π1; None unless a distilled model was evaluated with euler@1."""
    shown = [e for e in results.evaluations if e.row_of("euler@1")]
    if not any(e.subject.get("family") == "distilled" for e in shown):
        return None
    items = []
    for evaluation in shown:
        row = evaluation.row_of("euler@1")
        items.append(
            Panel(
                f"{evaluation.label}\neuler@1 · W2 {number(row['w2'], '.3g')}",
                ends=_vectors_of(evaluation.samples, "euler@1", "x1"),
                background=_vectors_of(evaluation.samples, INDEPENDENT, "x1"),
            )
        )
    settings = _settings(shown[0], "one-step samples Z1 (grey: π1)")
    caption = (
        f"Distillation versus reflow — {settings}. Distilling random pairs can at best learn E[X1 | X0] "
        "and collapses toward the conditional mean; reflow pairs are deterministic, so a one-step model "
        "distilled from them can match them."
    )
    return Image("figure-one-step.png", panels(items, settings), caption)


def straight_paths_figure(results: RunResults) -> Image | None:
    """The samples of the straight-paths grid: a row per path's flow, a column per ``euler@N``
    (Z1 over π1's reference sample); None unless the grid is shown and the data are 2D."""
    flows = path_flows(results)
    steps = euler_steps(flows)
    first = results.evaluations[0] if results.evaluations else None
    if len(flows) < 2 or not steps or first is None or first.samples["x0"].type.list_size != 2:
        return None
    items = []
    for evaluation in flows:
        reference = _vectors_of(evaluation.samples, INDEPENDENT, "x1")
        for n in steps:
            row, sampler = evaluation.row_of(f"euler@{n}"), f"euler@{n}"
            title = f"{path_label(evaluation)}\n{sampler}" + (f" · W2 {number(row['w2'], '.3g')}" if row else "")
            ends = _vectors_of(evaluation.samples, sampler, "x1") if row else np.zeros((0, 2), np.float32)
            items.append(Panel(title, ends=ends, background=reference))
    settings = _settings(first, f"Z1 of Euler N steps (grey: π1): the first {len(items[0].background)}")
    return Image(
        "figure-straight-paths.png",
        panels(items, settings, columns=len(steps)),
        f"Straight paths matter: samples of each path's flow by Euler N — {settings}.",
    )


def image_samples_figure(results: RunResults, shape: list[int]) -> Image:
    """Sample grids: a row per model, a column per sampler, after a column of the model's
    starting points Z0 (noise, or the source domain of a transfer) and one of π1's images."""
    first = results.evaluations[0]

    def images(evaluation: Evaluation, sampler: str, column: str) -> np.ndarray:
        return _vectors_of(evaluation.samples, sampler, column)[:GRID_IMAGES].reshape(-1, *shape)

    items = [("Z0 (source)", images(first, INDEPENDENT, "x0")), ("π1 (data)", images(first, INDEPENDENT, "x1"))]
    for evaluation in results.evaluations:
        for row in evaluation.rows():
            title = f"{evaluation.label}\n{row['sampler']} · NFE {row['nfe_mean']:.1f}"
            quality = row.get("fd_classifier")
            if quality is not None and not math.isnan(quality):
                title += f" · FD {number(quality, '.3g')}"
            items.append((title, images(evaluation, row["sampler"], "x1")))
    settings = _settings(first, f"the first {GRID_IMAGES} samples Z1 from the same Z0")
    return Image(
        "figure-image-samples.png",
        image_grids(items, settings, max(2, len(first.rows()))),
        f"Samples by model and sampler, first panels: the starting points Z0 and π1 — {settings}.",
    )


def figures(results: RunResults) -> list[Image]:
    """Every figure the stored results allow, in the report's order."""
    shown: list[Image | None] = [loss_figure(results)]
    if results.evaluations:
        first = results.evaluations[0]
        shown.insert(0, quality_figure(results))
        shape = first.config.get("pi0", {}).get("shape", [])
        if len(shape) == 3:
            shown.append(image_samples_figure(results, shape))
        if first.samples.num_rows and first.samples["x0"].type.list_size == 2:
            shown += [pairs_figure(results), paths_figure(results), samples_figure(results), one_step_figure(results)]
    return [figure for figure in shown if figure is not None]
