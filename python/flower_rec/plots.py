"""Plots of the evaluation: recommendation share vs training share per popularity group.

Drawn with ``matplotlib.figure.Figure`` and the Agg canvas directly, never through ``pyplot``:
no global figure state, no backend switch, so calling this from a notebook or an interactive
session leaves the user's matplotlib setup alone, and it works on machines without a display.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .files import atomic_write_bytes

__all__ = ["plot_group_shares"]

DEFAULT_TITLE = "Recommendation share vs training share per popularity group"


def plot_group_shares(
    group_shares: Sequence[float],
    gp_by_method: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = DEFAULT_TITLE,
    *,
    outside_by_method: Mapping[str, float] | None = None,
    figsize: tuple[float, float] = (8.0, 4.5),
    dpi: int = 150,
) -> Path:
    """Grouped bar chart, one cluster per popularity group (group 0 = most popular, left): the
    training share GH (grey, hatched) beside each method's recommendation share GP.

    ``gp_by_method`` maps a method name (the legend label) to its GP list, one value per group,
    in the order of ``group_shares``. ``outside_by_method`` optionally adds a last cluster,
    "outside", with each method's share of recommended titles that are in no group (GH is 0
    there by definition). The PNG is ``figsize * dpi`` pixels (1200 x 675 by default) and is
    written atomically. Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    gh = [float(share) for share in group_shares]
    num_groups = len(gh)
    if num_groups == 0:
        raise ValueError("at least one popularity group is needed")
    for method, gp in gp_by_method.items():
        if len(gp) != num_groups:
            raise ValueError(f"{method!r} has {len(gp)} group shares, expected {num_groups}")
    if outside_by_method is not None:
        missing = set(gp_by_method) - set(outside_by_method)
        if missing:
            raise ValueError(f"outside_by_method lacks {sorted(missing)}")

    labels = [str(group) for group in range(num_groups)]
    series: list[tuple[str, list[float]]] = [("training share (GH)", gh)]
    for method, gp in gp_by_method.items():
        values = [float(value) for value in gp]
        if outside_by_method is not None:
            values.append(float(outside_by_method[method]))
        series.append((f"{method} (GP)", values))
    if outside_by_method is not None:
        labels.append("outside")
        series[0] = (series[0][0], gh + [0.0])

    figure = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    colors = [f"C{index % 10}" for index in range(len(series))]
    for index, (label, values) in enumerate(series):
        offsets = [x + (index - (len(series) - 1) / 2) * width for x in range(len(labels))]
        # GH grey and hatched (readable in greyscale too), then one colour per method
        style = {"color": "0.6", "hatch": "//"} if index == 0 else {"color": colors[index - 1]}
        axes.bar(offsets, values, width, label=label, edgecolor="0.25", linewidth=0.6, **style)
    axes.set_xticks(range(len(labels)), labels)
    axes.set_xlabel("popularity group (0 = most popular, by training count)")
    axes.set_ylabel("share of items")
    axes.set_ylim(0, max(1e-9, max(max(values) for _, values in series)) * 1.12)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.35)
    axes.set_axisbelow(True)
    axes.legend(loc="upper right", frameon=False)

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())
