"""The analysis figures, drawn from `AnalysisResult.to_json()` (so from a saved analysis.json too) with
matplotlib's object API (no pyplot, no global state): each readable alone, with title, axes and legend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .clusters import require

# Okabe-Ito, colour-blind safe, one per method in every figure.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
CLASS_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#8C564B", "#7F7F7F")
GAP_AXIS = "distance between the centres of L2-normalised embeddings"
COEFFICIENT = r"$\max_j\,|\cos(\Delta, \Theta^j)|\cdot\|\Theta\|_F$"


def write_figures(analysis: dict[str, Any], folder: str | Path) -> list[Path]:
    """Draw every figure the analysis has data for into `folder` as PNG; returns the files written."""
    require("matplotlib", "analysis")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {
        "gap_before_after.png": gap_before_after,
        "coefficient_histogram.png": coefficient_histogram,
        "gap_vs_accuracy.png": gap_vs_accuracy,
        "time_per_episode.png": time_per_episode,
        "gap_enlarging.png": gap_enlarging,
    }
    if analysis.get("gap_along_adaptation"):
        figures["gap_along_adaptation.png"] = gap_along_adaptation
    written = []
    for name, draw in figures.items():
        written.append(_save(draw(analysis), folder / name))
    for domain, clusters in analysis.get("clusters", {}).items():
        if clusters:
            written.append(_save(cluster_figure(analysis, domain), folder / f"clusters_{_safe(domain)}.png"))
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _save(figure: Any, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    return path


def _figure(width: float = 6.4, height: float = 4.6, columns: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, axes


def _subtitle(analysis: dict[str, Any]) -> str:
    config = analysis["config"]
    domains = ", ".join(config["domains"])
    return f"{config['model']} · {domains} · {config['protocol']} · {config['episodes']} episodes"


def _methods(analysis: dict[str, Any], with_maps: bool = True) -> list[str]:
    methods = analysis["config"]["methods"]
    if not with_maps:
        return list(methods)
    return [m for m in methods if any(r.get("gap_after") is not None for r in _records(analysis, m))]


def _records(analysis: dict[str, Any], method: str) -> Iterator[dict[str, Any]]:
    for per_method in analysis["episodes"].values():
        yield from per_method.get(method, [])


def _values(analysis: dict[str, Any], method: str, *names: str) -> list[tuple[float, ...]]:
    rows = []
    for record in _records(analysis, method):
        values = tuple(record.get(n) for n in names)
        if all(v is not None for v in values):
            rows.append(values)
    return rows


def _colour(analysis: dict[str, Any], method: str) -> str:
    return COLOURS[analysis["config"]["methods"].index(method) % len(COLOURS)]


NO_MAPS = "no method with linear maps was analysed"


def _finish(figure: Any, ax: Any, analysis: dict[str, Any], heading: str, drawn: bool, **legend: Any) -> Any:
    """Legend and grid where something was drawn, a note where nothing was; the title and the run's line."""
    if drawn:
        ax.legend(fontsize=8, **legend)
        ax.grid(alpha=0.3)
    else:
        _empty(ax, NO_MAPS)
    ax.set_title(heading)
    figure.suptitle(_subtitle(analysis), fontsize=8)
    return figure


def _empty(ax: Any, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def gap_before_after(analysis: dict[str, Any]) -> Any:
    figure, (ax,) = _figure()
    drawn = []
    for method in _methods(analysis):
        points = np.array(_values(analysis, method, "gap_before", "gap_after"))
        before, after = points[:, 0], points[:, 1]
        ax.scatter(
            before,
            after,
            s=18,
            alpha=0.7,
            color=_colour(analysis, method),
            label=f"{method}: {before.mean():.3f} → {after.mean():.3f} (mean)",
        )
        drawn.append(points)
    if drawn:
        everything = np.concatenate(drawn)
        low, high = float(everything.min()), float(everything.max())
        ax.plot([low, high], [low, high], "k--", linewidth=1, label="after = before")
        ax.set_xlabel(f"gap before adaptation\n({GAP_AXIS}: plain backbone)")
        ax.set_ylabel("gap after adaptation (through the method's maps)")
    title = "Prototype–image gap of each episode's support set"
    return _finish(
        figure, ax, analysis, title, bool(drawn), title="method: gap before → after", title_fontsize=8
    )


def coefficient_histogram(analysis: dict[str, Any]) -> Any:
    figure, (ax,) = _figure()
    series = []
    for method in _methods(analysis):
        for name, label in (
            ("coefficient", "Θ"),
            ("coefficient_images", "Θ_I"),
            ("coefficient_prototypes", "Θ_P"),
        ):
            values = [v for (v,) in _values(analysis, method, name)]
            if values:
                series.append((f"{method} {label}", values, _colour(analysis, method), label == "Θ_P"))
    if series:
        everything = np.concatenate([v for _, v, _, _ in series])
        bins = np.linspace(min(everything.min(), 1.0) * 0.95, max(everything.max(), 1.0) * 1.05, 30)
        for label, values, colour, hatched in series:
            ax.hist(
                values,
                bins=bins,
                alpha=0.55,
                color=colour,
                hatch="//" if hatched else None,
                label=f"{label}: mean {np.mean(values):.3g}",
            )
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1.2, label="1 (the paper's claim: below)")
        ax.set_xlabel(f"coefficient {COEFFICIENT}  (Δ: gap before, $\\Theta^j$: column j of Θ)")
        ax.set_ylabel("episodes")
    title = r"The bound's coefficient after adaptation: $\|\Delta\Theta\| \leq$ coefficient $\cdot\|\Delta\|$"
    return _finish(figure, ax, analysis, title, bool(series))


def gap_vs_accuracy(analysis: dict[str, Any]) -> Any:
    figure, (ax,) = _figure()
    methods = _methods(analysis)
    for method in methods:
        points = np.array(_values(analysis, method, "gap_after", "accuracy"))
        correlation = np.corrcoef(points.T)[0, 1] if len(points) > 2 and points.std(0).all() else np.nan
        ax.scatter(
            points[:, 0],
            points[:, 1],
            s=18,
            alpha=0.7,
            color=_colour(analysis, method),
            label=f"{method} (Pearson r = {correlation:.2f})",
        )
    if methods:
        ax.set_xlabel(f"gap after adaptation ({GAP_AXIS})")
        ax.set_ylabel("query accuracy (%)")
    return _finish(
        figure, ax, analysis, "Gap after adaptation vs accuracy, one point per episode", bool(methods)
    )


def time_per_episode(analysis: dict[str, Any]) -> Any:
    figure, (ax,) = _figure()
    methods = _methods(analysis, with_maps=False)
    means, errors = [], []
    for method in methods:
        seconds = np.array([v for (v,) in _values(analysis, method, "seconds")])
        means.append(seconds.mean())
        errors.append(1.96 * seconds.std() / np.sqrt(len(seconds)))
    positions = np.arange(len(methods))
    ax.bar(
        positions, means, yerr=errors, capsize=4, color=[_colour(analysis, m) for m in methods], alpha=0.85
    )
    for x, mean in zip(positions, means, strict=True):
        ax.annotate(f"{mean:.3g} s", (x, mean), xytext=(0, 4), textcoords="offset points", ha="center")
    ax.set_xticks(positions, methods)
    if means and max(means) / max(min(means), 1e-9) > 30:
        ax.set_yscale("log")
    config = analysis["config"]
    ax.set_ylabel("seconds per episode (mean ± 95% CI)")
    ax.set_title(f"Time to adapt to one episode ({config['device']}, {config['threads']} threads)")
    ax.grid(axis="y", alpha=0.3)
    figure.suptitle(_subtitle(analysis), fontsize=8)
    return figure


def gap_enlarging(analysis: dict[str, Any]) -> Any:
    figure, (ax,) = _figure()
    drawn = False
    for method in _methods(analysis):
        curves = [c[method] for c in analysis.get("gap_enlarging", {}).values() if method in c]
        if not curves:
            continue
        weights = np.array([c["episodes"] for c in curves], dtype=float)
        gap = np.average([c["gap"] for c in curves], axis=0, weights=weights)
        loss = np.average([c["loss"] for c in curves], axis=0, weights=weights)
        original = float(np.average([c["original_gap"] for c in curves], weights=weights))
        colour = _colour(analysis, method)
        best = int(np.argmin(loss))
        ax.plot(gap, loss, marker="o", markersize=3, color=colour, label=f"{method}")
        ax.axvline(
            original, color=colour, linestyle="--", linewidth=1, label=f"{method} as adapted: {original:.3f}"
        )
        ax.scatter([gap[best]], [loss[best]], marker="*", s=160, color=colour, edgecolors="black", zorder=3)
        drawn = True
    if drawn:
        ax.set_xlabel(f"gap after moving images and prototypes apart along it\n(signed {GAP_AXIS})")
        ax.set_ylabel("validation loss (query cross-entropy)")
    title = "Gap-enlarging experiment: loss as the gap is narrowed or enlarged"
    return _finish(figure, ax, analysis, title, drawn, title="★ lowest loss", title_fontsize=8)


def gap_along_adaptation(analysis: dict[str, Any]) -> Any:
    figure, (gap_ax, coefficient_ax) = _figure(11, 4.4, columns=2)
    for method in _methods(analysis):
        traces = [t[method] for t in analysis["gap_along_adaptation"].values() if method in t]
        if not traces:
            continue
        colour = _colour(analysis, method)
        gap = np.mean([t["gap"] for t in traces], axis=0)
        coefficient = np.mean([t["coefficient"] for t in traces], axis=0)
        shared = any(r.get("coefficient") is not None for r in _records(analysis, method))
        gap_ax.plot(np.arange(len(gap)), gap, color=colour, label=method)
        label = f"{method} ({'Θ' if shared else 'Θ_I'})"
        coefficient_ax.plot(np.arange(len(coefficient)), coefficient, color=colour, label=label)
    gap_ax.set_xlabel("adaptation step")
    gap_ax.set_ylabel("gap (distance between the centres\nof L2-normalised embeddings)")
    gap_ax.set_title("Gap along adaptation (mean over episodes)")
    coefficient_ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    coefficient_ax.set_xlabel("adaptation step")
    coefficient_ax.set_ylabel(COEFFICIENT)
    coefficient_ax.set_title("Coefficient along adaptation (Δ: gap before)")
    for ax in (gap_ax, coefficient_ax):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    figure.suptitle(_subtitle(analysis), fontsize=8)
    return figure


def cluster_figure(analysis: dict[str, Any], domain: str) -> Any:
    clusters = analysis["clusters"][domain]
    panels = ["before"] + [m for m in analysis["config"]["methods"] if m in clusters]
    figure, axes = _figure(3.6 * len(panels), 3.9, columns=len(panels))
    labels = np.asarray(clusters["labels"])
    records = analysis["episodes"][domain]
    axis_name = "UMAP" if clusters["map"] == "umap" else "PC"
    for ax, panel in zip(axes, panels, strict=True):
        coords = np.asarray(clusters[panel])
        for label in np.unique(labels):
            chosen = labels == label
            colour = CLASS_COLOURS[int(label) % len(CLASS_COLOURS)]
            ax.scatter(
                coords[chosen, 0], coords[chosen, 1], s=22, color=colour, alpha=0.8, label=f"class {label}"
            )
        method = panels[1] if panel == "before" else panel
        record = next(r for r in records[method] if r["episode"] == clusters["episode"])
        score = record["silhouette_before" if panel == "before" else "silhouette_after"]
        shown = "undefined" if score is None else f"{score:.3f}"
        title = "Before adaptation (backbone)" if panel == "before" else f"After {panel}"
        ax.set_title(f"{title}\nsilhouette = {shown}", fontsize=10)
        ax.set_xlabel(f"{axis_name} 1")
        ax.set_ylabel(f"{axis_name} 2")
        ax.grid(alpha=0.3)
    if len(np.unique(labels)) <= 10:
        axes[-1].legend(fontsize=7, loc="best")
    figure.suptitle(
        f"Query images of {domain} episode {clusters['episode']}, L2-normalised, mapped to 2-D by "
        f"{clusters['map'].upper()} (colour: true class)",
        fontsize=10,
    )
    return figure
