"""Plots of the evaluation: recommendation share vs training share per popularity group, the
accuracy / fairness trade-off of flow guidance, and of trained variants over seeds.

Drawn with ``matplotlib.figure.Figure`` and the Agg canvas directly, never through ``pyplot``:
no global figure state, no backend switch, so calling this from a notebook or an interactive
session leaves the user's matplotlib setup alone, and it works on machines without a display.
"""

from __future__ import annotations

import io
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from .files import atomic_write_bytes

__all__ = [
    "plot_accuracy_fairness_panels",
    "plot_distribution_fit",
    "plot_group_share_panels",
    "plot_group_shares",
    "plot_guidance_curve",
]

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
    outside = None if outside_by_method is None else {"": outside_by_method}
    return plot_group_share_panels(group_shares, {"": gp_by_method}, path, title,
                                   outside=outside, figsize=figsize, dpi=dpi)


def plot_group_share_panels(
    group_shares: Sequence[float],
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike,
    title: str = DEFAULT_TITLE,
    *,
    outside: Mapping[str, Mapping[str, float]] | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 150,
) -> Path:
    """:func:`plot_group_shares` with one panel per entry of ``panels`` (its key the panel's
    title, e.g. a decoding; its value that panel's ``gp_by_method``), stacked and sharing the
    axes, so that many methods stay readable: past six methods the legend moves to the right of
    the panels, and one legend serves when every panel has the same methods. ``outside``: each
    panel's ``outside_by_method``. The default size grows with the number of panels (10 x 1.2 + 3
    inches each; 8 x 4.5 for one panel)."""
    gh = [float(share) for share in group_shares]
    if not gh:
        raise ValueError("at least one popularity group is needed")
    if not panels:
        raise ValueError("at least one panel is needed")
    for panel, gp_by_method in panels.items():
        for method, gp in gp_by_method.items():
            if len(gp) != len(gh):
                raise ValueError(f"{method!r} has {len(gp)} group shares, expected {len(gh)}")
        if outside is not None:
            missing = set(gp_by_method) - set(outside.get(panel, {}))
            if missing:
                raise ValueError(f"outside_by_method lacks {sorted(missing)}")

    if figsize is None:
        figsize = (8.0, 4.5) if len(panels) == 1 else (10.0, 1.2 + 3.0 * len(panels))
    figure = _new_figure(figsize, dpi)
    grid = figure.subplots(len(panels), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    many = max(len(gp_by_method) for gp_by_method in panels.values()) > 6
    # The same methods in every panel have the same colours: one legend says it.
    shared_legend = len({tuple(gp_by_method) for gp_by_method in panels.values()}) == 1
    highest = 0.0
    for index, (axes, (panel, gp_by_method)) in enumerate(zip(grid, panels.items())):
        outside_shares = None if outside is None else outside[panel]
        labels, top = _group_bars(axes, gh, gp_by_method, outside_shares)
        highest = max(highest, top)
        axes.set_ylabel("share of items")
        axes.grid(axis="y", alpha=0.35)
        axes.set_axisbelow(True)
        if panel:
            axes.set_title(panel, fontsize="medium")
        if index and shared_legend:
            continue
        if many:
            axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                        fontsize="small")
        else:
            axes.legend(loc="upper right", frameon=False)
    grid[-1].set_xticks(range(len(labels)), labels)
    grid[-1].set_xlabel("popularity group (0 = most popular, by training count)")
    grid[0].set_ylim(0, max(1e-9, highest) * 1.12)  # shared by every panel
    if len(panels) > 1:
        figure.suptitle(title)
    else:
        grid[0].set_title(title)
    return _save(figure, path, dpi)


def _group_bars(
    axes, gh: list[float], gp_by_method: Mapping[str, Sequence[float]],
    outside_by_method: Mapping[str, float] | None,
) -> tuple[list[str], float]:
    """The bars of one panel (GH grey and hatched, readable in greyscale too, then one colour
    per method); returns the cluster labels and the highest bar."""
    labels = [str(group) for group in range(len(gh))]
    series: list[tuple[str, list[float]]] = [("training share (GH)", gh)]
    for method, gp in gp_by_method.items():
        values = [float(value) for value in gp]
        if outside_by_method is not None:
            values.append(float(outside_by_method[method]))
        series.append((f"{method} (GP)", values))
    if outside_by_method is not None:
        labels.append("outside")
        series[0] = (series[0][0], gh + [0.0])
    width = 0.8 / len(series)
    for index, (label, values) in enumerate(series):
        offsets = [x + (index - (len(series) - 1) / 2) * width for x in range(len(labels))]
        # Past ten methods the colours come round again, dotted then crossed (as the markers of
        # plot_accuracy_fairness_panels change), so that no two methods look alike.
        style = {"color": "0.6", "hatch": "//"} if index == 0 else {
            "color": f"C{(index - 1) % 10}", "hatch": ("", "..", "xx")[(index - 1) // 10 % 3]}
        axes.bar(offsets, values, width, label=label, edgecolor="0.25", linewidth=0.6, **style)
    return labels, max(max(values) for _, values in series)


def _new_figure(figsize: tuple[float, float], dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _new_axes(figsize: tuple[float, float], dpi: int):
    figure = _new_figure(figsize, dpi)
    return figure, figure.add_subplot()


def _save(figure, path: str | os.PathLike, dpi: int) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_accuracy_fairness_panels(
    panels: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]],
    path: str | os.PathLike,
    title: str = "Accuracy vs popularity bias, mean ± sd over seeds",
    *,
    baseline: str | None = None,
    min_accuracy: float | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 150,
) -> Path:
    """NDCG@10 against DGU, one panel per entry of ``panels`` (its key the panel's title, e.g. a
    decoding; its value maps each method to its runs' metrics, one mapping with ``"DGU"`` and
    ``"NDCG@10"`` per seed): each method a point at its mean with error bars of one standard
    deviation (none for a single run), in the same colour and marker in every panel. With
    ``baseline`` (a method present in every panel), its mean DGU is a dotted line and, with
    ``min_accuracy``, ``min_accuracy`` x its mean NDCG@10 a dashed one: points left of the
    first and above the second are fairer at the accuracy asked. Lower DGU is fairer, so the
    good corner is top left. The panels sit side by side (5 inches each, plus 3.5 for the
    legend, by 4.5). Written atomically; returns the path."""
    if not panels:
        raise ValueError("at least one panel is needed")
    for panel, methods in panels.items():
        for method, runs in methods.items():
            if not runs:
                raise ValueError(f"{method!r} has no runs in panel {panel!r}")
            for run in runs:
                missing = {"DGU", "NDCG@10"} - set(run)
                if missing:
                    raise ValueError(f"a run of {method!r} lacks {sorted(missing)}")
        if baseline is not None and baseline not in methods:
            raise ValueError(f"the baseline {baseline!r} is not in panel {panel!r}")
    if min_accuracy is not None and baseline is None:
        raise ValueError("min_accuracy needs a baseline")

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    names = list(dict.fromkeys(method for methods in panels.values() for method in methods))
    style = {name: {"color": f"C{index % 10}", "marker": "osD^v<>pP*"[index // 10 % 10]}
             for index, name in enumerate(names)}
    if figsize is None:
        figsize = (5.0 * len(panels) + 3.5, 4.5)
    figure = _new_figure(figsize, dpi)
    grid = figure.subplots(1, len(panels), squeeze=False)[0]
    handles = {}
    for axes, (panel, methods) in zip(grid, panels.items()):
        for method, runs in methods.items():
            dgu = [float(run["DGU"]) for run in runs]
            ndcg = [float(run["NDCG@10"]) for run in runs]
            point = axes.errorbar(statistics.fmean(dgu), statistics.fmean(ndcg), xerr=spread(dgu),
                                  yerr=spread(ndcg), linestyle="none", markersize=7, capsize=3,
                                  **style[method])
            handles.setdefault(method, point)
        if baseline is not None:
            runs = methods[baseline]
            axes.axvline(statistics.fmean(float(run["DGU"]) for run in runs), color="0.5",
                         linestyle=":", linewidth=1)
            if min_accuracy is not None:
                floor = min_accuracy * statistics.fmean(float(run["NDCG@10"]) for run in runs)
                axes.axhline(floor, color="0.5", linestyle="--", linewidth=1)
        axes.set_title(panel, fontsize="medium")
        axes.set_xlabel("DGU (lower is fairer)")
        axes.grid(alpha=0.35)
    grid[0].set_ylabel("NDCG@10")
    lines = []
    if baseline is not None:
        lines.append(f"dotted: {baseline}'s DGU")
        if min_accuracy is not None:
            lines.append(f"dashed: {min_accuracy:g} x {baseline}'s NDCG@10")
    figure.legend(list(handles.values()), list(handles), loc="outside right upper",
                  frameon=False, fontsize="small",
                  title="\n".join(lines) or None, title_fontsize="small")
    figure.suptitle(title)
    return _save(figure, path, dpi)


def plot_guidance_curve(
    curve: Sequence[Mapping[str, float | str]],
    chosen: Mapping[str, float | str],
    path: str | os.PathLike,
    title: str = "Flow guidance: accuracy vs popularity bias",
    *,
    min_accuracy: float | None = None,
    figsize: tuple[float, float] = (7.0, 4.5),
    dpi: int = 150,
) -> Path:
    """NDCG@10 against DGU over beta, one line per guidance form, each starting from the
    unguided point (beta = 0, form ``"any"``), the chosen point ringed, and the accuracy floor
    of the selection (``min_accuracy`` x the unguided NDCG@10) dashed. Lower DGU is fairer, so
    the good corner is top left. Written atomically; returns the path."""
    baseline = next(point for point in curve if point["beta"] == 0)
    forms = sorted({str(point["form"]) for point in curve if point["beta"] != 0})
    figure, axes = _new_axes(figsize, dpi)
    for index, form in enumerate(forms):
        points = [baseline] + sorted(
            (p for p in curve if p["form"] == form and p["beta"] != 0), key=lambda p: p["beta"]
        )
        axes.plot([p["DGU"] for p in points], [p["NDCG@10"] for p in points], marker="o",
                  color=f"C{index}", label=f"guidance {form}")
        for point in points[1:]:
            axes.annotate(f"{point['beta']:g}", (point["DGU"], point["NDCG@10"]),
                          textcoords="offset points", xytext=(4, 4), fontsize=7,
                          color=f"C{index}")
    axes.scatter([baseline["DGU"]], [baseline["NDCG@10"]], color="black", zorder=3,
                 label="no guidance (beta 0)")
    axes.scatter([chosen["DGU"]], [chosen["NDCG@10"]], s=220, facecolors="none",
                 edgecolors="red", linewidths=2, zorder=4,
                 label=f"chosen: beta {chosen['beta']:g} ({chosen['form']})")
    if min_accuracy is not None:
        axes.axhline(min_accuracy * baseline["NDCG@10"], color="0.5", linestyle="--",
                     linewidth=1, label=f"{min_accuracy:g} x unguided NDCG@10")
    axes.set_xlabel("DGU (popularity bias of the lists; lower is fairer)")
    axes.set_ylabel("NDCG@10")
    axes.set_title(title)
    axes.grid(alpha=0.35)
    axes.legend(loc="best", fontsize=8, framealpha=0.85)
    return _save(figure, path, dpi)


def plot_distribution_fit(
    target_shares: Sequence[float],
    shares_by_method: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = "Generated share vs target share by title rank",
    *,
    figsize: tuple[float, float] = (8.0, 4.5),
    dpi: int = 150,
) -> Path:
    """Distribution fitting: the target's share of each title (grey bars, titles in descending
    target order) and each method's generated share of the same titles (lines), on a log scale
    so that the tail is visible. Written atomically; returns the path."""
    target = [float(share) for share in target_shares]
    for method, shares in shares_by_method.items():
        if len(shares) != len(target):
            raise ValueError(f"{method!r} has {len(shares)} shares, expected {len(target)}")
    figure, axes = _new_axes(figsize, dpi)
    ranks = list(range(1, len(target) + 1))
    axes.bar(ranks, target, color="0.8", width=1.0, label="target")
    for index, (method, shares) in enumerate(shares_by_method.items()):
        axes.plot(ranks, [max(float(s), 1e-6) for s in shares], color=f"C{index}",
                  linewidth=1.2, label=method)
    axes.set_yscale("log")
    axes.set_xlabel("title rank in the target (most frequent first)")
    axes.set_ylabel("share")
    axes.set_title(title)
    axes.grid(alpha=0.35)
    axes.legend(loc="upper right", fontsize=8, framealpha=0.85)
    return _save(figure, path, dpi)
