"""The paper's analyses over episodes: `analyze` runs each method on each episode on its own, timed, and
records its accuracy, the gap before and after, the bound's coefficient, cluster quality, the gap-enlarging
curve and (for url and copa) the gap along the steps. The episodes are `evaluate`'s for the same seed, so
the two agree on accuracy; Accelerate deals them to processes and gathers the records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adaptation import adapt_to_task
from ..batching import largest_first
from ..distributed import use_cpu
from ..evaluation import Domain, EpisodeSource, confidence_interval, hyperparameters_for
from ..files import write_text_atomically
from ..frozen import frozen_backbone
from ..learners import available_methods, get_learner, learner_class
from ..validation import CopaValueError, check_int
from .clusters import MAP_METHODS, embedding_map, silhouette
from .gap import ENLARGING_SCALES, GapTrace, episode_gap, gap_enlarging_curve

# What the JSON's numbers mean (written into it, so that the file explains itself).
DEFINITIONS = {
    "gap_before": "‖mean − mean‖₂ of L2-normalised support images and their class prototypes (each image "
    "paired with its class's prototype, as the official figures), plain backbone features",
    "gap_input": "the same on the features the maps act on (= gap_before except for tsa and copa+tsa, whose "
    "maps act on the adapted backbone's features)",
    "gap_after": "the same after the head's maps: images through Θ_I, prototypes through Θ_P",
    "gap_mapped": "one shared map: ‖Δ Θ‖₂, Δ the normalised input gap vector pushed through Θ (not "
    "normalised again), which the bound bounds",
    "bound": "coefficient · ‖Δ‖₂ ≥ gap_mapped",
    "coefficient": "max_j |cos(Δ, Θʲ)| · ‖Θ‖_F of the shared map (Θʲ its j-th column, Z = X Θ)",
    "coefficient_images": "the same for Θ_I (two maps)",
    "coefficient_prototypes": "the same for Θ_P (two maps)",
    "silhouette_before": "silhouette (scikit-learn, Euclidean) of the L2-normalised query images under their "
    "labels, plain backbone features; null where undefined",
    "silhouette_after": "the same for the query images as the head embeds them",
    "accuracy": "query accuracy, percent",
    "seconds": "wall time of adapting to the support set (feature learners: from cached features; tsa and "
    "copa+tsa: from the images, backbone passes included)",
    "best_enlarging_scale": "the scale s of the gap-enlarging experiment with the lowest query loss (0: as "
    "adapted; > 0: a larger gap)",
}
EPISODE_FIELDS = tuple(DEFINITIONS)


@dataclass
class AnalysisResult:
    """Per-episode records and their aggregates, by domain then method (see `DEFINITIONS`)."""

    episodes: dict[str, dict[str, list[dict[str, Any]]]]
    config: dict[str, Any]
    enlarging: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    traces: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, dict[str, dict[str, dict[str, float | int | None]]]]:
        """domain -> method -> field -> {mean, ci95, n} over the episodes where the field is defined."""
        return {
            domain: {method: summarise_records(records) for method, records in per_method.items()}
            for domain, per_method in self.episodes.items()
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "episodes": self.episodes,
            "gap_enlarging": self.enlarging,
            "gap_along_adaptation": self.traces,
            "clusters": self.clusters,
            "definitions": DEFINITIONS,
            "config": self.config,
        }

    def save(self, path: str | Path) -> None:
        write_text_atomically(path, json.dumps(self.to_json(), indent=2) + "\n")

    def table(self) -> str:
        """Markdown: per domain and method, mean ± 95% CI of accuracy, gaps, coefficient, silhouette, time."""
        columns = ("accuracy", "gap_before", "gap_after", "coefficient", "silhouette_after", "seconds")
        lines = ["| domain | method | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
        for domain, per_method in self.summary.items():
            for method, stats in per_method.items():
                cells = []
                for name in columns:
                    value = stats.get(name) or {}
                    if name == "coefficient" and value.get("mean") is None:
                        value = stats.get("coefficient_images") or {}
                    mean = value.get("mean")
                    cells.append("—" if mean is None else f"{mean:.3g} ± {value['ci95']:.2g}")
                lines.append(f"| {domain} | {method} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def summarise_records(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    stats = {}
    for name in EPISODE_FIELDS:
        values = [r[name] for r in records if r.get(name) is not None]
        stats[name] = {
            "mean": float(np.mean(values)) if values else None,
            "ci95": confidence_interval(values) if values else None,
            "n": len(values),
        }
    return stats


def analyze(
    model: Any,
    domains: Sequence[Domain],
    methods: Sequence[str] = ("url", "copa"),
    overrides: dict[str, dict[str, Any]] | None = None,
    cluster_episode: int = 0,
    cluster_map: str = "auto",
    trace: bool = True,
    model_name: str | None = None,
    **episode_options: Any,
) -> AnalysisResult:
    """Run the analyses of `methods` on the episodes of each domain.

    `episode_options` are `evaluate`'s (protocol, num_episodes, seed, sampling, shuffle_buffer_size,
    load_dataset, image_processor, cache_dir, progress, num_workers, mixed_precision: see `EpisodeSource`),
    so the same options give the same episodes. Each episode is adapted on its own, so that its time is its
    own. Methods without a linear map (ncc, finetune, ...) are timed and scored and their gap fields are null;
    at least one method must have maps. `cluster_episode` picks the episode whose query embeddings are
    mapped to 2-D (`cluster_map`: "umap", "pca" or "auto"); `trace` records the gap after every step for url
    and copa (a second, untimed fit).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise CopaValueError(f"Unknown method(s) {unknown}; choose from {available_methods()}.")
    with_maps = [m for m in methods if learner_class(m).linear_maps]
    if not with_maps:
        analysable = [m for m in available_methods() if learner_class(m).linear_maps]
        raise CopaValueError(
            f"No gap to analyse: {', '.join(methods)} learn no linear map of images and prototypes; add one "
            f"of {', '.join(analysable)} (the others are then timed and scored beside it)."
        )
    if callable(getattr(model, "feature_members", None)):
        raise CopaValueError(
            "The analyses measure one backbone's prototype-image gap; pass one backbone, not a backbone set "
            "(evaluate several-backbone methods with `hf-copa evaluate`)."
        )
    source = EpisodeSource(model, **episode_options)
    num_episodes = check_int("num_episodes", source.num_episodes, 1)
    check_int("cluster_episode", cluster_episode, 0)
    if cluster_episode >= num_episodes:
        raise CopaValueError(
            f"cluster_episode {cluster_episode} is not among the {num_episodes} episodes "
            f"(0..{num_episodes - 1})."
        )
    if cluster_map not in MAP_METHODS:
        raise CopaValueError(f"cluster_map must be one of {MAP_METHODS}, got {cluster_map!r}.")
    state = PartialState(cpu=use_cpu())
    overrides = overrides or {}
    result = AnalysisResult({}, {})
    used_hyperparameters: dict[str, dict[str, Any]] = {}
    used_map = None
    kinds = {"pooled"} | {
        learner_class(m).feature_kind for m in methods if not learner_class(m).needs_backbone
    }
    for domain in domains:
        dataset, episodes, features = source.domain(domain, kinds, state)
        images = source.images(dataset, domain)
        mine = largest_first(episodes)[state.process_index :: state.num_processes]
        used_hyperparameters[domain.name] = {}
        local = []
        for method in methods:
            hp = hyperparameters_for(getattr(model, "config", None), domain, method, overrides)
            used_hyperparameters[domain.name][method] = hp
            show = source.progress and state.is_main_process
            with tqdm(
                total=len(mine), unit="episode", desc=f"analyze {domain.name} {method}", disable=not show
            ) as bar:
                for position in mine:
                    outcome = analyse_episode(
                        model, features, images, episodes[position], method, hp, state.device, trace
                    )
                    outcome["record"] = {"episode": position, **outcome["record"]}
                    if position != cluster_episode:  # only the mapped episode's embeddings are kept
                        outcome.pop("queries_before", None)
                        outcome.pop("queries_after", None)
                    local.append((method, position, outcome))
                    bar.update(1)
        gathered = gather_object(local) if state.num_processes > 1 else local
        result.episodes[domain.name] = {}
        for method in methods:
            outcomes = [o for m, _, o in sorted(gathered, key=lambda x: x[1]) if m == method]
            result.episodes[domain.name][method] = [o["record"] for o in outcomes]
            curves = [o["curve"] for o in outcomes if o.get("curve") is not None]
            if curves:
                result.enlarging.setdefault(domain.name, {})[method] = mean_curve(curves)
            traces = [o["trace"] for o in outcomes if o.get("trace") is not None]
            if traces:
                result.traces.setdefault(domain.name, {})[method] = {
                    key: np.mean([t[key] for t in traces], axis=0).tolist() for key in ("gap", "coefficient")
                }
        if state.is_main_process:
            clusters, used_map = cluster_maps(
                gathered, methods, cluster_episode, episodes[cluster_episode], cluster_map
            )
            result.clusters[domain.name] = clusters
    result.config = {
        "model": model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "methods": list(methods),
        "protocol": source.protocol,
        "episodes": num_episodes,
        "seed": source.seed,
        "sampling": source.sampling,
        **({"shuffle_buffer_size": source.shuffle_buffer_size} if source.sampling == "official" else {}),
        "decoder": getattr(source.processor, "decoder", None),
        "processes": state.num_processes,
        "device": state.device.type,
        "threads": torch.get_num_threads(),
        "domains": {d.name: {"path": d.path, "split": d.split} for d in domains},
        "roles": {d.name: d.role for d in domains},
        "hyperparameters": used_hyperparameters,
        "cluster_episode": cluster_episode,
        "cluster_map": used_map,
        "trace": trace,
        "enlarging_scales": list(ENLARGING_SCALES),
    }
    return result


def analyse_episode(
    model: Any,
    features: dict[str, Any],
    images: Any,
    episode: Any,
    method: str,
    hyperparameters: dict[str, Any],
    device: torch.device,
    trace: bool,
) -> dict[str, Any]:
    """One method on one episode: its record, gap-enlarging curve, step trace and query embeddings."""
    learner = get_learner(method, **hyperparameters)
    labels = torch.as_tensor(episode.support_labels, dtype=torch.long)
    truth = torch.as_tensor(episode.query_labels, dtype=torch.long)
    plain_support = features["pooled"][episode.support_indices]
    plain_queries = features["pooled"][episode.query_indices]
    if learner.needs_backbone:
        with frozen_backbone(model, device):
            adapted = adapt_to_task(
                model,
                labels,
                learner,
                support_images=images.pixel_values(episode.support_indices),
                query_images=images.pixel_values(episode.query_indices),
            )
        head, seconds = adapted.head, adapted.seconds
        support, queries = adapted.support_features, adapted.query_features
    else:
        kind = learner.feature_kind
        support = features[kind][episode.support_indices].to(device)
        queries = features[kind][episode.query_indices].to(device)
        _synchronize(device)
        started = time.perf_counter()
        head = learner.fit(support, labels.to(device))
        _synchronize(device)
        seconds = time.perf_counter() - started
    predicted = head.logits(queries.to(head.prototypes)).argmax(1).cpu()
    record: dict[str, Any] = dict.fromkeys(EPISODE_FIELDS)
    record["accuracy"] = 100 * float((predicted == truth).double().mean())
    record["seconds"] = seconds
    outcome: dict[str, Any] = {"record": record}
    if not learner.linear_maps:
        return outcome
    support, queries = support.cpu(), queries.cpu()
    head = head.to("cpu")
    gap = episode_gap(head, support, labels, plain_support if learner.needs_backbone else None)
    record.update(gap.to_json())
    image_view, prototype_view = head.view(support)
    query_view = head.view(queries)[0]
    record["silhouette_before"] = silhouette(plain_queries, truth)
    record["silhouette_after"] = silhouette(query_view, truth)
    curve = gap_enlarging_curve(image_view, labels, prototype_view, query_view, truth, head.scale)
    record["best_enlarging_scale"] = curve.best_scale
    outcome["curve"] = vars(curve)
    outcome["queries_before"] = plain_queries.cpu().double().numpy()
    outcome["queries_after"] = query_view.double().numpy()
    if trace and not learner.needs_backbone:
        observed = get_learner(method, **hyperparameters)
        observed.step_observer = steps = GapTrace(support, labels)
        observed.fit(support, labels)
        outcome["trace"] = {"gap": steps.gaps, "coefficient": steps.coefficients}
    return outcome


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_curve(curves: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The gap-enlarging curves of many episodes, averaged per scale."""
    losses = np.mean([c["losses"] for c in curves], axis=0)
    return {
        "scales": curves[0]["scales"],
        "gap": np.mean([c["gaps"] for c in curves], axis=0).tolist(),
        "loss": losses.tolist(),
        "accuracy": (100 * np.mean([c["accuracies"] for c in curves], axis=0)).tolist(),
        "original_gap": float(np.mean([c["original_gap"] for c in curves])),
        "best_scale": curves[0]["scales"][int(np.argmin(losses))],
        "episodes_best_above_zero": float(np.mean([c["best_scale"] > 0 for c in curves])),
        "episodes": len(curves),
    }


def cluster_maps(
    gathered: Sequence[tuple[str, int, dict[str, Any]]],
    methods: Sequence[str],
    position: int,
    episode: Any,
    map_method: str,
) -> tuple[dict[str, Any], str | None]:
    """2-D maps of one episode's query embeddings, before adaptation and after each method with maps."""
    at = {m: o for m, p, o in gathered if p == position and "queries_after" in o}
    if not at:
        return {}, None
    first = at[next(m for m in methods if m in at)]
    before, used = embedding_map(first["queries_before"], map_method)
    maps = {"episode": position, "labels": np.asarray(episode.query_labels).tolist(), "map": used}
    maps["before"] = before.tolist()
    for method in methods:
        if method in at:
            maps[method] = embedding_map(at[method]["queries_after"], used)[0].tolist()
    return maps, used
