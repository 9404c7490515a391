"""What the Space does, without the UI: check a user's task against the limits, adapt, and show the result.

The Gradio app (`spaces/copa-few-shot/app.py`) only wires widgets to these functions, so everything here is
testable without a browser:

- `build_task` turns (class name, image files) slots and query files into a `Task`, or raises a `TaskError`
  whose message is written for the person who uploaded the files (never a traceback);
- `run_task` adapts the backbone with the chosen method and returns probabilities, the adaptation time and
  the embedding space before and after adaptation (`EmbeddingView`), with the prototype-image gap;
- `embedding_figure`, `predictions_html` and `summary_markdown` present a `TaskResult`;
- `push_classifier` uploads the adapted head with the user's own token;
- `example_tasks` lists the bundled example tasks (real images, see `assets/examples/README.md`);
- `SessionUploads` keeps each session's uploaded files while it lasts and deletes them when it ends or
  idles (the rule is `SessionUploads.describe()`).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .adaptation import adapt_to_task
from .analysis import (
    embedding_map,
    episode_gap,
    head_maps,
    paired_prototypes,
    prototype_image_gap,
    silhouette,
)
from .analysis.gap import EpisodeGap
from .folders import load_class_folders, sample_task_dir
from .heads import AdaptedHead
from .image_processing_copa import to_rgb_image
from .learners.base import methods_for
from .learners.registry import method_descriptions, shown_value
from .losses import NORM_EPS, class_means, one_hot_labels
from .modeling_copa import CopaForFewShotClassification
from .validation import CopaError, class_order

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .modeling_copa import CopaModel

EXAMPLES_DIR = Path(__file__).parent / "assets" / "examples"
# Colour-blind-safe palette (Okabe-Ito, then Tableau), one colour per class in the plot and the result cards.
CLASS_COLOURS = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#D55E00",
    "#56B4E9",
    "#8C564B",
    "#7F7F7F",
    "#BCBD22",
    "#17BECF",
)
_THUMBNAIL_SIDE = 72
# Larger uploads are shrunk to this side once read (up to 80 full 4096-pixel images would hold 4 GB).
WORKING_SIDE = 1024


class TaskError(ValueError):
    """A problem with what the user gave (not a bug): its message is shown to them as it is."""


@dataclass(frozen=True)
class TaskLimits:
    """Caps that keep one request small enough for a shared CPU Space; `describe()` states them in the UI."""

    max_classes: int = 5
    max_images_per_class: int = 20
    max_support_images: int = 60
    max_query_images: int = 20
    max_file_bytes: int = 5 * 1024 * 1024
    max_image_side: int = 4096
    max_name_length: int = 40

    def describe(self) -> str:
        return (
            f"2 to {self.max_classes} classes, up to {self.max_images_per_class} images per class and "
            f"{self.max_support_images} support images in all, up to {self.max_query_images} query images; "
            f"each image at most {file_size(self.max_file_bytes)} and {self.max_image_side} pixels a side."
        )


def file_size(count: int) -> str:
    """A byte count for people: 5 MB, 1.5 MB, 300 KB, 12 bytes."""
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{count} bytes"


@dataclass
class Task:
    """A checked few-shot task: RGB support images with their class names, and named query images."""

    support_images: list[PIL.Image.Image]
    support_labels: list[str]
    query_images: list[PIL.Image.Image]
    query_names: list[str]

    @property
    def class_names(self) -> list[str]:
        return list(dict.fromkeys(self.support_labels))


def build_task(
    classes: Sequence[tuple[str | None, Sequence[str | Path] | None]],
    queries: Sequence[str | Path] | None,
    limits: TaskLimits = TaskLimits(),
) -> Task:
    """Check and load a task: `classes` holds one (name, image files) pair per class slot; empty slots are
    skipped. Raises `TaskError` with a message for the user on the first problem found."""
    named: list[tuple[str, list[Path]]] = []
    for slot, (raw_name, files) in enumerate(classes, start=1):
        name = (raw_name or "").strip()
        paths = [Path(f) for f in files or []]
        if not name and not paths:
            continue
        if not name:
            raise TaskError(f"Class {slot} has {len(paths)} image(s) but no name: type a name for it.")
        if len(name) > limits.max_name_length:
            raise TaskError(f"Class name {name[:20]!r}... is too long (at most {limits.max_name_length}).")
        if not paths:
            raise TaskError(f"Class {name!r} has no images: upload at least one (or clear its name).")
        if len(paths) > limits.max_images_per_class:
            raise TaskError(
                f"Class {name!r} has {len(paths)} images; the limit is {limits.max_images_per_class} a class."
            )
        same = [other for other, _ in named if other.casefold() == name.casefold()]
        if same:
            raise TaskError(f"Classes {same[0]!r} and {name!r} have the same name: give each its own name.")
        named.append((name, paths))
    if len(named) < 2:
        found = f" (only {named[0][0]!r})" if named else ""
        raise TaskError(f"Name at least 2 classes and upload images for each{found}.")
    if len(named) > limits.max_classes:
        raise TaskError(f"{len(named)} classes given; the limit is {limits.max_classes}.")
    total = sum(len(paths) for _, paths in named)
    if total > limits.max_support_images:
        raise TaskError(f"{total} support images given; the limit is {limits.max_support_images} in all.")
    query_paths = [Path(f) for f in queries or []]
    if not query_paths:
        raise TaskError("Upload at least one query image: the images to classify.")
    if len(query_paths) > limits.max_query_images:
        raise TaskError(f"{len(query_paths)} query images given; the limit is {limits.max_query_images}.")

    support_images, support_labels = [], []
    for name, paths in named:
        for path in paths:
            support_images.append(load_image(path, f"class {name!r}", limits))
            support_labels.append(name)
    query_images = [load_image(path, "the query images", limits) for path in query_paths]
    return Task(support_images, support_labels, query_images, [p.name for p in query_paths])


def load_image(path: str | Path, where: str, limits: TaskLimits = TaskLimits()) -> PIL.Image.Image:
    """One uploaded file -> an RGB image, checking its size before decoding it (no decompression bombs)."""
    path = Path(path)
    label = f"{path.name!r} ({where})"
    if not path.is_file():
        raise TaskError(
            f"The file {label} is no longer on the server (uploads are deleted when a session ends or "
            "idles); upload it again."
        )
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise TaskError(
            f"The file {label} is {file_size(size)}; the limit is {file_size(limits.max_file_bytes)}."
        )
    try:
        with PIL.Image.open(path) as image:
            if max(image.size) > limits.max_image_side:
                raise TaskError(
                    f"The image {label} is {image.width}x{image.height} pixels; the limit is "
                    f"{limits.max_image_side} pixels a side."
                )
            image.load()
            rgb = to_rgb_image(image, name=label)
            rgb = rgb.copy() if rgb is image else rgb  # independent of the file, which closes here
    except TaskError:
        raise
    except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError, SyntaxError) as err:
        kind = (
            "not an image file that can be read"
            if isinstance(err, PIL.UnidentifiedImageError)
            else (f"a damaged or unsupported image ({err})")
        )
        raise TaskError(
            f"The file {label} is {kind}; upload a PNG, JPEG, WebP, GIF, BMP or TIFF image."
        ) from None
    except (ValueError, TypeError) as err:  # to_rgb_image's own checks (e.g. an empty image)
        raise TaskError(f"The file {label} cannot be used: {err}") from None
    if max(rgb.size) > WORKING_SIDE:  # bounds a request's memory; the backbone sees 84 px or less anyway
        rgb.thumbnail((WORKING_SIDE, WORKING_SIDE), PIL.Image.Resampling.LANCZOS)
    return rgb


# --- adaptation and the embedding space ------------------------------------------------------------------


@dataclass
class EmbeddingView:
    """One embedding space of a task: L2-normalised support images, prototypes and queries, [N, d] each, with
    the prototype–image gap and the support set's silhouette (`hf_copa.analysis`; None where undefined)."""

    title: str
    support: np.ndarray
    prototypes: np.ndarray
    queries: np.ndarray
    gap: float
    silhouette: float | None = None

    @classmethod
    def from_embeddings(
        cls,
        title: str,
        support: torch.Tensor,
        prototypes: torch.Tensor,
        queries: torch.Tensor,
        support_labels: torch.Tensor,
    ) -> EmbeddingView:
        def unit(x: torch.Tensor) -> np.ndarray:
            return F.normalize(x.double(), dim=-1, eps=NORM_EPS).numpy()

        # The paper's gap, each support image paired with its class prototype (the official figures').
        gap = prototype_image_gap(support, paired_prototypes(prototypes, support_labels.cpu()))
        quality = silhouette(support, support_labels.cpu().numpy())
        return cls(title, unit(support), unit(prototypes), unit(queries), gap, quality)

    def projection_2d(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(support, prototypes, queries) as 2-D points: one PCA of all three together (scikit-learn's)."""
        points = np.concatenate([self.support, self.prototypes, self.queries])
        coords, _ = embedding_map(points, "pca")
        first, second = len(self.support), len(self.support) + len(self.prototypes)
        return coords[:first], coords[first:second], coords[second:]


def embedding_views(
    head: AdaptedHead,
    support_features: torch.Tensor,
    query_features: torch.Tensor,
    support_labels: torch.Tensor,
    adapted_support: torch.Tensor | None = None,
    adapted_queries: torch.Tensor | None = None,
) -> tuple[EmbeddingView, EmbeddingView]:
    """The task before adaptation (backbone features, prototypes = their class means) and after it, through
    the head's own maps: Θ_I for images and Θ_P for prototypes (CoPA), one map for both (URL), none (NCC).

    For heads with adapters (TSA), `adapted_support` / `adapted_queries` are the features of the backbone
    run with them, which the head's maps and prototypes apply to; `support_labels` are 0..C-1.
    """
    support = support_features.to(head.prototypes)
    queries = query_features.to(head.prototypes)
    # Heads on feature maps (copa-transformer) are shown before adaptation by the pooled features.
    pooled_support, pooled_queries = (x.mean(dim=(2, 3)) if x.dim() == 4 else x for x in (support, queries))
    one_hot = one_hot_labels(support_labels.view(1, -1).to(support.device), head.num_classes, support.dtype)
    before = EmbeddingView.from_embeddings(
        "Before adaptation",
        pooled_support,
        class_means(pooled_support.unsqueeze(0), one_hot)[0],
        pooled_queries,
        support_labels,
    )
    inside = " and residual adapters in the backbone" if head.adapters else ""
    if head.backbone_weights:
        inside = " and every backbone layer fine-tuned"
    title = f"After adaptation ({head.method}: {head.embedding_space()}{inside})"
    if head.adapts_backbone:
        if adapted_support is None or adapted_queries is None:
            raise ValueError(f"A {head.method} head needs the features of its adapted backbone for the view.")
        support, queries = adapted_support.to(head.prototypes), adapted_queries.to(head.prototypes)
    images, prototypes = head.view(support)
    after = EmbeddingView.from_embeddings(title, images, prototypes, head.view(queries)[0], support_labels)
    return before, after


@dataclass
class TaskResult:
    """What one run produced: probabilities [Nq, C] (columns in `labels` order), timing, both views."""

    method: str
    hyperparameters: dict[str, Any]
    labels: list[Hashable]
    query_names: list[str]
    query_images: list[PIL.Image.Image]
    probabilities: np.ndarray
    adaptation_seconds: float
    support_labels: list[str]
    support_images: list[PIL.Image.Image]
    before: EmbeddingView
    after: EmbeddingView
    classifier: CopaForFewShotClassification = field(repr=False)
    gap: EpisodeGap | None = None  # the bound's coefficient, for heads with linear maps (hf_copa.analysis)

    def predictions(self) -> list[dict[str, Any]]:
        """Per query image: its name, the best class, and every class's probability (best first)."""
        results = []
        for name, row in zip(self.query_names, self.probabilities.tolist(), strict=True):
            order = sorted(range(len(row)), key=lambda i: -row[i])
            results.append(
                {
                    "image": name,
                    "label": self.labels[order[0]],
                    "probabilities": {self.labels[i]: row[i] for i in order},
                }
            )
        return results

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "hyperparameters": self.hyperparameters,
            "classes": list(self.labels),
            "adaptation_seconds": self.adaptation_seconds,
            "gap_before": self.before.gap,
            "gap_after": self.after.gap,
            "coefficient": None if self.gap is None else self.gap.coefficient,
            "coefficient_images": None if self.gap is None else self.gap.coefficient_images,
            "coefficient_prototypes": None if self.gap is None else self.gap.coefficient_prototypes,
            "silhouette_before": self.before.silhouette,
            "silhouette_after": self.after.silhouette,
            "predictions": self.predictions(),
        }


def methods(model: Any = None) -> dict[str, str]:
    """The methods a user can pick, default first, with what each one learns (from the learner registry);
    the Space holds one backbone, so the several-backbone methods (sur, urt) are not among them, and with
    `model`, only those it serves (EfficientNet-Lite has no residual adapters for tsa and copa+tsa)."""
    described = method_descriptions(one_backbone=True)
    if model is None:
        return described
    served = set(methods_for(model))
    return {name: what for name, what in described.items() if name in served}


def run_task(model: CopaModel, task: Task, method: str = "copa", **hyperparameters: Any) -> TaskResult:
    """Adapt `model` to the task with `method` (hyperparameters default to the model's config) and classify
    the queries. `adaptation_seconds` covers what a user waits for: support features plus fitting the head.

    Each image goes through the backbone once, or twice for methods that adapt the backbone (TSA): once
    plain for the "before" view, once adapted for the logits and the "after" view.
    """
    if method not in methods(model):
        raise TaskError(f"Unknown method {method!r}; choose one of {', '.join(methods(model))}.")
    class_names = class_order(task.support_labels)
    index = {label: i for i, label in enumerate(class_names)}
    labels = torch.tensor([index[label] for label in task.support_labels])
    adapted = adapt_to_task(
        model,
        labels,
        method,
        support_images=task.support_images,
        query_images=task.query_images,
        **hyperparameters,
    )
    head = adapted.head
    probabilities = torch.softmax(adapted.query_logits(), dim=-1).double().numpy()
    plain_support = None
    if head.adapts_backbone:  # the plain backbone's features, for the view before adaptation
        plain_support = model.extract_features(task.support_images)
        query_features = model.extract_features(task.query_images)
        before, after = embedding_views(
            head, plain_support, query_features, labels, adapted.support_features, adapted.query_features
        )
    else:
        before, after = embedding_views(head, adapted.support_features, adapted.query_features, labels)
    gap = None
    if head_maps(head) is not None:
        gap = episode_gap(head, adapted.support_features.cpu(), labels, plain_support)
    classifier = CopaForFewShotClassification.from_adapted(
        model, head, class_names, support_labels=list(task.support_labels)
    )
    return TaskResult(
        method=method,
        hyperparameters=dict(head.hyperparameters),
        labels=classifier.labels,
        query_names=list(task.query_names),
        query_images=list(task.query_images),
        probabilities=probabilities,
        adaptation_seconds=adapted.seconds,
        support_labels=list(task.support_labels),
        support_images=list(task.support_images),
        before=before,
        after=after,
        classifier=classifier,
        gap=gap,
    )


# --- presentation ----------------------------------------------------------------------------------------


def class_colour(index: int) -> str:
    return CLASS_COLOURS[index % len(CLASS_COLOURS)]


def embedding_figure(result: TaskResult) -> Figure:
    """Two panels, before and after adaptation: support images (dots), prototypes (stars) and queries
    (diamonds, coloured by their predicted class), in a 2-D PCA of each space, with the gap in the title."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as err:  # pragma: no cover - the demo extra installs it
        raise ImportError("The embedding plot needs matplotlib: pip install 'hf-copa[demo]'.") from err

    label_index = {label: i for i, label in enumerate(result.labels)}
    support_colours = [class_colour(label_index[label]) for label in result.support_labels]
    predicted = result.probabilities.argmax(1)
    figure = Figure(figsize=(11, 5.6), dpi=100, layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, view in zip(axes, (result.before, result.after), strict=True):
        support, prototypes, queries = view.projection_2d()
        ax.scatter(support[:, 0], support[:, 1], c=support_colours, s=40, alpha=0.6, linewidths=0)
        ax.scatter(
            prototypes[:, 0],
            prototypes[:, 1],
            c=[class_colour(i) for i in range(len(prototypes))],
            marker="*",
            s=420,
            edgecolors="black",
            linewidths=1.2,
            zorder=3,
        )
        ax.scatter(
            queries[:, 0],
            queries[:, 1],
            facecolors="white",
            edgecolors=[class_colour(int(i)) for i in predicted],
            marker="D",
            s=70,
            linewidths=2,
            zorder=4,
        )
        for number, (x, y) in enumerate(queries, start=1):
            ax.annotate(str(number), (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8, zorder=5)
        image_mean, prototype_mean = support.mean(0), prototypes.mean(0)
        ax.plot(*zip(image_mean, prototype_mean, strict=True), "k--", linewidth=1.5, zorder=2)
        ax.scatter(*image_mean, marker="o", s=90, c="white", edgecolors="black", linewidths=1.5, zorder=3)
        ax.scatter(*prototype_mean, marker="s", s=70, c="white", edgecolors="black", linewidths=1.5, zorder=3)
        ax.set_title(f"{view.title}\nprototype–image gap = {view.gap:.3f}", fontsize=11)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.25)
    class_handles = [
        Line2D([], [], marker="o", linestyle="", color=class_colour(i), markersize=9, label=str(label))
        for i, label in enumerate(result.labels)
    ]
    grey = {"linestyle": "", "markeredgecolor": "black"}
    kind_handles = [
        Line2D(
            [], [], marker="o", color="#999999", alpha=0.6, linestyle="", markersize=7, label="support image"
        ),
        Line2D([], [], marker="*", color="#999999", **grey, markersize=16, label="prototype (class mean)"),
        Line2D(
            [],
            [],
            marker="D",
            markerfacecolor="white",
            **grey,
            markersize=8,
            label="query (edge: predicted class)",
        ),
        Line2D([], [], marker="o", markerfacecolor="white", **grey, markersize=9, label="mean of images"),
        Line2D([], [], marker="s", markerfacecolor="white", **grey, markersize=8, label="mean of prototypes"),
        Line2D([], [], color="black", linestyle="--", label="gap (drawn in 2-D)"),
    ]
    figure.legend(
        handles=class_handles + kind_handles,
        loc="outside lower center",
        ncol=min(6, len(class_handles) + len(kind_handles)),
        frameon=False,
        fontsize=9,
    )
    return figure


# Inline styles (the HTML must look right wherever it is shown); colours follow the gradio theme's variables.
_STYLES = {
    "results": "display:grid;gap:10px;grid-template-columns:repeat(auto-fill,minmax(300px,1fr))",
    "card": "display:flex;gap:12px;padding:10px;border:1px solid var(--border-color-primary,#e5e7eb);"
    "border-radius:10px;background:var(--block-background-fill)",
    "thumbnail": f"width:{_THUMBNAIL_SIDE}px;height:{_THUMBNAIL_SIDE}px;object-fit:contain;"
    "image-rendering:pixelated;border-radius:6px;background:#fff;flex:none",
    "body": "flex:1;min-width:0",
    "name": "font-size:12px;opacity:0.7",
    "prediction": "font-weight:600;font-size:16px;margin:2px 0 4px",
    "row": "display:flex;align-items:center;gap:6px;font-size:13px;margin:2px 0",
    "label": "width:38%;overflow:hidden;text-overflow:ellipsis;white-space:nowrap",
    "track": "flex:1;height:10px;background:var(--border-color-primary,#e5e7eb);border-radius:5px;"
    "overflow:hidden",
    "bar": "display:block;height:100%",
    "value": "width:52px;text-align:right",
    "support": "display:flex;flex-wrap:wrap;align-items:center;gap:6px 18px;margin:0 0 10px;font-size:13px",
    "support_class": "display:flex;align-items:center;gap:3px",
    "support_thumbnail": "width:34px;height:34px;object-fit:contain;image-rendering:pixelated;"
    "border-radius:4px;background:#fff;border-bottom:3px solid",
}


def predictions_html(result: TaskResult) -> str:
    """The support set as thumbnails per class, then one card per query image: its thumbnail, the predicted
    class, and a bar for every class's probability (images inline, so nothing is kept on the server)."""
    label_index = {label: i for i, label in enumerate(result.labels)}
    style = _STYLES
    cards = []
    for number, (prediction, image) in enumerate(
        zip(result.predictions(), result.query_images, strict=True), start=1
    ):
        rows = "".join(
            f'<div class="copa-class" style="{style["row"]}">'
            f'<span style="{style["label"]}">{html.escape(str(label))}</span>'
            f'<span style="{style["track"]}"><span style="{style["bar"]};width:{probability * 100:.1f}%;'
            f'background:{class_colour(label_index[label])}"></span></span>'
            f'<span class="copa-probability" style="{style["value"]}">{probability:.1%}</span></div>'
            for label, probability in prediction["probabilities"].items()
        )
        best = prediction["label"]
        best_colour = class_colour(label_index[best])
        cards.append(
            f'<div class="copa-card" style="{style["card"]}">'
            f'<img src="{thumbnail_data_url(image)}" alt="query {number}" style="{style["thumbnail"]}">'
            f'<div style="{style["body"]}">'
            f'<div style="{style["name"]}">#{number} · {html.escape(prediction["image"])}</div>'
            f'<div class="copa-prediction" style="{style["prediction"]};color:{best_colour}">'
            f"{html.escape(str(best))} · {prediction['probabilities'][best]:.0%}</div>{rows}</div></div>"
        )
    support = "".join(
        f'<span style="{style["support_class"]}"><b style="color:{class_colour(index)};margin-right:3px">'
        f"{html.escape(str(label))}</b>"
        + "".join(
            f'<img src="{thumbnail_data_url(image, 68)}" alt="{html.escape(str(label))}" '
            f'style="{style["support_thumbnail"]} {class_colour(index)}">'
            for image, image_label in zip(result.support_images, result.support_labels, strict=True)
            if image_label == label
        )
        + "</span>"
        for index, label in enumerate(result.labels)
    )
    return (
        f'<div class="copa-support" style="{style["support"]}"><span style="opacity:0.7">Support set:</span>'
        f'{support}</div><div class="copa-results" style="{style["results"]}">{"".join(cards)}</div>'
    )


def thumbnail_data_url(image: PIL.Image.Image, side: int = _THUMBNAIL_SIDE * 2) -> str:
    """A small PNG of the image inline (data: URL), so that showing it needs no file kept on the server."""
    thumbnail = image.copy()
    thumbnail.thumbnail((side, side))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def summary_markdown(result: TaskResult) -> str:
    """The run in a few lines: method, classes, time taken, hyperparameters, then the analysis: the gap
    before and after, the bound's coefficient and the support set's silhouette (`hf_copa.analysis`)."""
    settings = ", ".join(f"{key}={shown_value(value)}" for key, value in result.hyperparameters.items())

    def shown(value: float | None) -> str:
        return "undefined (one image per class)" if value is None else f"{value:.3f}"

    lines = [
        f"**{result.method}** adapted to **{len(result.labels)} classes** from "
        f"{len(result.support_labels)} support images in **{result.adaptation_seconds:.2f} s** "
        f"(support features + fitting the head; {settings}), "
        f"then classified {len(result.query_names)} query image(s).",
        f"Prototype–image gap ‖mean of image embeddings − mean of prototype embeddings‖ (L2-normalised "
        f"support embeddings): **{result.before.gap:.3f}** before → **{result.after.gap:.3f}** after "
        "adaptation.",
    ]
    gap = result.gap
    if gap is not None and gap.coefficient is not None:
        lines.append(
            f"Coefficient of the gap's bound max_j |cos(Δ, Θʲ)|·‖Θ‖_F: **{gap.coefficient:.3f}** "
            f"(‖ΔΘ‖ = {gap.mapped:.3f} ≤ {gap.bound:.3f})."
        )
    elif gap is not None and gap.coefficient_images is not None:
        lines.append(
            "Coefficients of the gap's bound max_j |cos(Δ, Θʲ)|·‖Θ‖_F: "
            f"Θ_I **{gap.coefficient_images:.3f}**, Θ_P **{gap.coefficient_prototypes:.3f}**."
        )
    lines.append(
        f"Cluster quality of the support images (silhouette, −1..1, higher is better): "
        f"**{shown(result.before.silhouette)}** before → **{shown(result.after.silhouette)}** after."
    )
    return "\n\n".join(lines)


# --- the Hub ---------------------------------------------------------------------------------------------


def push_classifier(classifier: CopaForFewShotClassification, repo_id: str | None, token: str | None) -> str:
    """Push the adapted head to `repo_id` with the user's token; returns the commit URL, or raises TaskError
    with a message that says what to fix (the token itself is never echoed)."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, token = (repo_id or "").strip(), (token or "").strip()
    if not repo_id or not token:
        raise TaskError(
            "Give a repository id (your-name/copa-head) and a Hugging Face token with write access."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise TaskError(
            f"{repo_id!r} is not a valid repository id; use the form your-name/copa-head."
        ) from None
    # The HTTP client's base error (httpx's HTTPError): connection failures are not HfHubHTTPErrors.
    http_errors = tuple(c for c in HfHubHTTPError.__mro__ if c.__name__ == "HTTPError")
    try:
        commit = classifier.push_to_hub(repo_id, token=token)
    except http_errors as err:
        response = getattr(err, "response", None) if isinstance(err, HfHubHTTPError) else None
        status = getattr(response, "status_code", None)
        reason = {401: "the token was rejected", 403: "the token may not write to this repository"}.get(
            status, f"the Hub answered {status}" if status else "the Hub could not be reached"
        )
        raise TaskError(f"Could not push to {repo_id!r}: {reason}.") from None
    except (CopaError, ValueError, OSError) as err:
        raise TaskError(f"Could not push to {repo_id!r}: {err}") from None
    return commit.commit_url


# --- bundled examples ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExampleTask:
    """A bundled task of real images: (class name, image paths) per class, and query image paths."""

    title: str
    classes: list[tuple[str, list[Path]]]
    queries: list[Path]


def example_tasks() -> dict[str, ExampleTask]:
    """The example tasks by key: the package's Quick, Draw! sample and those under `assets/examples`."""
    sources = {"quickdraw": ("Quick, Draw! sketches", sample_task_dir("quickdraw"))}
    titles = {
        "fashion_mnist": "Fashion-MNIST clothes",
        "mnist": "MNIST digits",
        "omniglot": "Omniglot letters",
    }
    for key, title in titles.items():
        if (EXAMPLES_DIR / key).is_dir():
            sources[key] = (title, EXAMPLES_DIR / key)
    tasks = {}
    for key, (title, folder) in sources.items():
        paths, labels = load_class_folders(folder / "support")
        classes = [
            (name, [p for p, label in zip(paths, labels, strict=True) if label == name])
            for name in dict.fromkeys(labels)
        ]
        queries, _ = load_class_folders(folder / "query")
        names = ", ".join(name for name, _ in classes)
        title = f"{title}: {names}" if len(names) < 40 else f"{title} ({len(classes)} classes)"
        tasks[key] = ExampleTask(title, classes, queries)
    return tasks


# --- a session's uploads ---------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """Seconds for people: 1 hour, 1.5 hours, 30 minutes, 1 minute, 2 seconds, 0.5 seconds."""
    for unit, scale in (("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= scale or unit == "second":
            value = f"{seconds / scale:.1f}".removesuffix(".0")
            return f"{value} {unit}" + ("" if value == "1" else "s")
    raise AssertionError  # pragma: no cover


@dataclass
class _Session:
    files: set[Path] = field(default_factory=set)
    last_seen: float = 0.0


class SessionUploads:
    """Which uploaded files each session of the Space holds, and when they are deleted.

    Every request of a session (`touch`) restarts its idle clock and lets it hold the uploads it names. Its
    files are deleted when it ends (`end`: the page was closed or reloaded) or once `idle_seconds` pass
    without a request from it (`sweep`, run every `check_seconds`), whichever comes first. An upload that no
    session holds (e.g. sent to the API, never run) is deleted by `sweep` once `idle_seconds` have passed
    since it was written. Gradio stores an upload under a salted hash of its content, so two sessions that
    upload the same image share one file: it goes when the last of them ends or idles.

    Only files inside `root` (gradio's upload folder) are ever deleted, and never those with the content of
    a file in `keep` (the bundled examples, whose cached copies every session shares).
    """

    def __init__(
        self,
        root: str | Path,
        idle_seconds: float,
        keep: Iterable[str | Path] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not idle_seconds > 0:
            raise ValueError(f"idle_seconds must be positive, got {idle_seconds!r}")
        self.root = Path(root).resolve()
        self.idle_seconds = float(idle_seconds)
        self.check_seconds = min(60.0, max(0.5, self.idle_seconds / 4))
        self._keep = {(Path(p).stat().st_size, _digest(Path(p))) for p in keep}
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        """The rule, as the Space states it to its users."""
        idle = duration(self.idle_seconds)
        return (
            "Your uploaded images stay on the server while your session lasts, so that you can rerun with "
            "another method without uploading them again. They are deleted when you close or reload the page "
            f"(or its connection to the server drops), or once {idle} passes without a request from you (an "
            "upload, a run or a push), whichever comes first; an upload that no session holds is deleted "
            f"{idle} after it arrived. The idle time is checked every {self.check_seconds:g} seconds; the "
            "bundled examples stay."
        )

    def _is_upload(self, path: Path) -> bool:
        """A file in the upload folder that is not a copy of a bundled example."""
        if self.root not in path.parents or not path.is_file():
            return False
        if self._keep:
            with suppress(OSError):
                size = path.stat().st_size
                if any(size == kept_size for kept_size, _ in self._keep):
                    return (size, _digest(path)) not in self._keep
        return True

    def touch(self, session: str | None, paths: Iterable[str | Path] = ()) -> None:
        """A request from `session`: its idle clock restarts, and it holds those of `paths` that are uploads
        (in `root`, not bundled examples)."""
        if not session:
            return
        files = {Path(p).resolve() for p in paths}
        files = {p for p in files if self._is_upload(p)}
        with self._lock:
            state = self._sessions.setdefault(session, _Session())
            state.files |= files
            state.last_seen = self._clock()

    def holds(self, session: str) -> frozenset[Path]:
        with self._lock:
            state = self._sessions.get(session)
            return frozenset(state.files) if state else frozenset()

    @property
    def sessions(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def end(self, session: str | None) -> list[Path]:
        """The session is over: delete the files it held that no other session holds. Returns them."""
        with self._lock:
            state = self._sessions.pop(session, None) if session else None
            if state is None:
                return []
            held = set().union(*(other.files for other in self._sessions.values()))
            return self._delete(state.files - held)

    def sweep(self, uploaded: Iterable[str | Path] = ()) -> list[Path]:
        """End the sessions idle for `idle_seconds`, then delete those of `uploaded` (the files gradio
        received) that no session holds and that were written `idle_seconds` ago or earlier."""
        now = self._clock()
        with self._lock:
            idle = [s for s, state in self._sessions.items() if now - state.last_seen >= self.idle_seconds]
        deleted = [path for session in idle for path in self.end(session)]
        with self._lock:
            held = set().union(*(state.files for state in self._sessions.values()))
            orphans = []
            for path in {Path(p).resolve() for p in uploaded} - held:
                with suppress(OSError):
                    info = path.stat()
                    if now - info.st_mtime >= self.idle_seconds and self._is_upload(path):
                        orphans.append(path)
            return deleted + self._delete(set(orphans))

    def close(self, uploaded: Iterable[str | Path] = ()) -> list[Path]:
        """The server stops: delete every session's files and every upload in `uploaded`."""
        with self._lock:
            files = set().union(*(state.files for state in self._sessions.values()))
            self._sessions.clear()
            files |= {p for p in (Path(u).resolve() for u in uploaded) if self._is_upload(p)}
            return self._delete(files)

    def _delete(self, paths: set[Path]) -> list[Path]:
        deleted = []
        for path in sorted(paths):
            if self.root not in path.parents:
                continue
            with suppress(FileNotFoundError):
                path.unlink()
                deleted.append(path)
            if path.parent != self.root:  # gradio's per-upload folder, now empty
                with suppress(OSError):
                    os.rmdir(path.parent)
        return deleted


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
