"""Episodes x learners x domains -> mean accuracy and 95% confidence interval.

Every figure is the same whatever the number of processes: episode i depends
only on (seed, i), and episodes are adapted in fixed chunks (sorted by support
size, so padding is small) that are dealt to processes round-robin; each process
adapts its chunks batched and the per-episode accuracies are gathered.

Learners that adapt the backbone itself (TSA, CoPA+TSA) cannot use cached
features: each of their episodes loads its images, adapts on the support
images (one batch through the backbone, on the process's device) and embeds
the queries through the adapted backbone. Those episodes are dealt to the
processes one by one, largest first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adaptation import adapt_to_task
from .batching import episode_chunks, largest_first, pad_episodes
from .distributed import use_cpu
from .episodes import Episode, make_sampler
from .frozen import frozen_backbone
from .learners import available_methods, get_learner, learner_class
from .splits import RawImages, SplitSpec, load_split
from .validation import CopaValueError, check_int


@dataclass
class Domain:
    """One evaluation domain: a dataset split, its role, and per-method hyperparameter overrides."""

    name: str
    path: str
    split: str = "test"
    role: str | None = None  # "seen", "unseen" or None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    image_column: str = "image"
    label_column: str = "label"

    @classmethod
    def parse(cls, spec: str) -> Domain:
        """`PATH_OR_ID[:SPLIT]` -> Domain named after the last path component."""
        split = SplitSpec.parse(spec, default_split="test")
        return cls(name=split.name, path=split.path, split=split.split)


def parse_override(text: str) -> tuple[str | None, str, str, Any]:
    """`[DOMAIN:]METHOD:KEY=VALUE` -> (domain or None, method, key, value)."""
    head, sep, value = text.partition("=")
    parts = head.split(":")
    if not sep or len(parts) not in (2, 3) or not all(parts):
        raise ValueError(
            f"Bad override {text!r}; use [DOMAIN:]METHOD:KEY=VALUE, e.g. mnist:copa:preset=high-lr."
        )
    domain, method, key = (None, *parts) if len(parts) == 2 else parts
    if method not in available_methods():
        raise ValueError(f"Override {text!r} names unknown method {method!r}; known: {available_methods()}.")
    return domain, method, key, _parse_value(value)


def _parse_value(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def confidence_interval(accuracies: Sequence[float]) -> float:
    """1.96 * std / sqrt(n) (population std, as Meta-Dataset / URL report it)."""
    values = np.asarray(accuracies, dtype=np.float64)
    return float(1.96 * values.std() / math.sqrt(len(values))) if len(values) else float("nan")


def adapt_and_score(
    features: Any,
    episodes: Sequence[Episode],
    method: str,
    hyperparameters: dict[str, Any],
    device: torch.device | str = "cpu",
) -> list[float]:
    """Query accuracy of each episode after batched adaptation of its support set; `features` is a
    [num_rows, d] tensor (maps: [num_rows, d, h, w]) or `features.RowFeatures`, indexed by dataset row."""
    learner = get_learner(method, **hyperparameters)
    support, labels, num_classes = pad_episodes(features, episodes)
    heads = learner.check_converged(learner.fit_batch(support.to(device), labels.to(device), num_classes))
    accuracies = []
    for head, episode in zip(heads, episodes, strict=True):
        query = features[torch.as_tensor(episode.query_indices)].to(device)
        predicted = head.logits(query).argmax(dim=1).cpu()
        accuracies.append(float((predicted == torch.as_tensor(episode.query_labels)).float().mean()))
    return accuracies


def adapt_images_and_score(
    model: Any,
    images: EpisodeImages,
    episode: Episode,
    method: str,
    hyperparameters: dict[str, Any],
) -> float:
    """Query accuracy of one episode for a learner that adapts the backbone (`needs_backbone`)."""
    adapted = adapt_to_task(
        model,
        torch.as_tensor(episode.support_labels, dtype=torch.long),
        get_learner(method, **hyperparameters),
        support_images=images.pixel_values(episode.support_indices),
        query_images=images.pixel_values(episode.query_indices),
    )
    predicted = adapted.query_logits().argmax(dim=1).cpu()
    return float((predicted == torch.as_tensor(episode.query_labels)).float().mean())


class EpisodeImages:
    """Pixel values of dataset rows, decoded on demand (what backbone-adapting learners need per episode)."""

    def __init__(
        self, dataset: Any, processor: Any, image_column: str = "image", encoded: bool = False
    ) -> None:
        self.images = RawImages(dataset, image_column, encoded=encoded)
        self.processor = processor

    def pixel_values(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        return self.processor(self.images.rows(rows), return_tensors="pt")["pixel_values"]


def adapt_one_by_one(
    features: torch.Tensor, episodes: Sequence[Episode], method: str, hyperparameters: dict[str, Any]
) -> list[float]:
    """The reference path for `adapt_and_score`: each episode on its own."""
    return [adapt_and_score(features, [episode], method, hyperparameters)[0] for episode in episodes]


@dataclass
class EvaluationResult:
    results: dict[str, dict[str, dict[str, float]]]
    averages: dict[str, dict[str, float]]
    config: dict[str, Any]
    episode_accuracies: dict[str, dict[str, list[float]]] = field(default_factory=dict, repr=False)

    @property
    def average_rank(self) -> dict[str, float]:
        """Method -> its rank per domain averaged over the domains (see `average_ranks`)."""
        return average_ranks(self.results, self.config["methods"])

    def to_json(self, per_episode: bool = False) -> dict[str, Any]:
        data = {
            "results": self.results,
            "averages": self.averages,
            "average_rank": self.average_rank,
            "config": self.config,
        }
        if per_episode:
            data["episode_accuracies"] = self.episode_accuracies
        return data

    def save(self, path: str | Path, per_episode: bool = False) -> None:
        Path(path).write_text(json.dumps(self.to_json(per_episode), indent=2) + "\n")

    def table(self) -> str:
        """Markdown table: mean ± 95% CI per domain and method, then the averages."""
        methods = list(self.config["methods"])
        lines = ["| domain | role | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
        for domain, per_method in self.results.items():
            role = self.config["roles"].get(domain) or ""
            cells = [f"{per_method[m]['mean']:.2f} ± {per_method[m]['ci95']:.2f}" for m in methods]
            lines.append(f"| {domain} | {role} | " + " | ".join(cells) + " |")
        for group, per_method in self.averages.items():
            lines.append(
                f"| **average ({group})** | | " + " | ".join(f"{per_method[m]:.2f}" for m in methods) + " |"
            )
        if len(methods) > 1:
            ranks = self.average_rank
            lines.append("| **average rank** | | " + " | ".join(f"{ranks[m]:.2f}" for m in methods) + " |")
        return "\n".join(lines)


def average_ranks(
    results: dict[str, dict[str, dict[str, float]]], methods: Sequence[str]
) -> dict[str, float]:
    """The papers' Average Rank: on each domain the methods are ranked by mean accuracy (1 = best), and each
    method's ranks are averaged over the domains.

    Accuracies are compared as the table shows them (rounded to 2 decimals), so methods the table shows
    equal are tied; tied methods share the mean of the ranks they span (two methods tied for first both get
    1.5), which keeps the ranks of a domain summing to 1 + 2 + ... + M whatever the ties.
    """
    methods = list(methods)
    if not results:
        return {m: float("nan") for m in methods}
    totals = dict.fromkeys(methods, 0.0)
    for per_method in results.values():
        shown = {m: round(per_method[m]["mean"], 2) for m in methods}
        for m in methods:
            better = sum(shown[other] > shown[m] for other in methods)
            tied = sum(shown[other] == shown[m] for other in methods)  # counts m itself
            totals[m] += better + (tied + 1) / 2
    return {m: round(totals[m] / len(results), 4) for m in methods}


def summarise(
    accuracies: dict[str, dict[str, list[float]]], domains: Sequence[Domain], methods: Sequence[str]
) -> tuple[dict, dict]:
    results = {
        d.name: {
            m: {
                "mean": round(100 * float(np.mean(accuracies[d.name][m])), 4),
                "ci95": round(100 * confidence_interval(accuracies[d.name][m]), 4),
                "episodes": len(accuracies[d.name][m]),
            }
            for m in methods
        }
        for d in domains
    }
    groups = {
        "seen": [d for d in domains if d.role == "seen"],
        "unseen": [d for d in domains if d.role == "unseen"],
    }
    averages = {}
    for group, members in groups.items():
        if members:
            averages[group] = {
                m: round(float(np.mean([results[d.name][m]["mean"] for d in members])), 4) for m in methods
            }
    if len(domains) > 1:
        averages["all"] = {
            m: round(float(np.mean([results[d.name][m]["mean"] for d in domains])), 4) for m in methods
        }
    return results, averages


def hyperparameters_for(
    model_config: Any, domain: Domain, method: str, global_overrides: dict
) -> dict[str, Any]:
    """The hyperparameters `method` runs with on `domain`: model config < global < per-domain overrides."""
    merged = {**global_overrides.get(method, {}), **domain.overrides.get(method, {})}
    preset = merged.pop("preset", None)
    config_overrides = (
        getattr(model_config, "adaptation", {}).get(method) if model_config is not None else None
    )
    return get_learner(method, preset, config_overrides=config_overrides, **merged).hyperparameters


SAMPLINGS = ("independent", "official")


def domain_episodes(
    domain: Domain,
    dataset: Any,
    protocol: str,
    num_episodes: int,
    seed: int,
    sampling: str = "independent",
    shuffle_buffer_size: int = 0,
) -> list[Episode]:
    """The episodes of one domain, from its labels alone (no image is decoded).

    `independent`: episode i from (seed, i) over any labelled split (`hf_copa.episodes`). `official`: the
    episodes Meta-Dataset's own pipeline emits for a converted source, in order (`hf_copa.meta_dataset`).
    """
    if sampling == "official":
        from .meta_dataset import official_sampler

        sampler = official_sampler(
            domain.path, domain.split, protocol, seed, num_episodes, shuffle_buffer_size, dataset=dataset
        )
        return list(sampler)
    if sampling != "independent":
        raise CopaValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}.")
    if shuffle_buffer_size:
        raise CopaValueError("A shuffle buffer applies to official sampling only (--sampling official).")
    sampler = make_sampler(
        protocol, dataset, label_column=domain.label_column, seed=seed, num_episodes=num_episodes
    )
    return [sampler.episode(i) for i in range(num_episodes)]


def rows_used(episodes: Sequence[Episode]) -> np.ndarray:
    """The dataset rows the episodes touch, sorted: the only images a run embeds."""
    return np.unique(np.concatenate([np.concatenate([e.support_indices, e.query_indices]) for e in episodes]))


@dataclass
class EpisodeSource:
    """What `evaluate` and `hf_copa.analysis.analyze` share: per domain, its split, its episodes (drawn from
    the labels alone) and the features of the rows they touch, each row embedded once (the main process first,
    so that the others read its cache)."""

    model: Any
    protocol: str = "meta-dataset"
    num_episodes: int = 600
    seed: int = 0
    sampling: str = "independent"
    shuffle_buffer_size: int = 0
    load_dataset: Callable[[Domain], Any] | None = None
    image_processor: Any = None
    cache_dir: str | Path | None = None
    progress: bool = True
    num_workers: int = 0
    mixed_precision: bool = True

    def __post_init__(self) -> None:
        self.load_dataset = self.load_dataset or (lambda domain: load_split(domain.path, domain.split))
        self.processor = self.image_processor or self.model.default_image_processor()
        self.encoded = getattr(self.processor, "decoder", None) == "meta-dataset"

    def domain(
        self, domain: Domain, kinds: set[str], state: Any
    ) -> tuple[Any, list[Episode], dict[str, Any]]:
        """(split, episodes, feature kind -> `RowFeatures`) of `domain`; `kinds`: "pooled" and/or "maps"."""
        from .features import extract_row_features

        dataset = self.load_dataset(domain)
        episodes = domain_episodes(
            domain,
            dataset,
            self.protocol,
            self.num_episodes,
            self.seed,
            self.sampling,
            self.shuffle_buffer_size,
        )
        features = {}
        for kind in sorted(kinds):
            with state.main_process_first():
                features[kind] = extract_row_features(
                    self.model,
                    dataset,
                    rows_used(episodes),
                    image_processor=self.processor,
                    image_column=domain.image_column,
                    cache_dir=self.cache_dir,
                    progress=self.progress and state.is_main_process,
                    device=state.device,
                    num_workers=self.num_workers,
                    mixed_precision=self.mixed_precision,
                    spatial=kind == "maps",
                )
        return dataset, episodes, features

    def images(self, dataset: Any, domain: Domain) -> EpisodeImages:
        return EpisodeImages(dataset, self.processor, domain.image_column, encoded=self.encoded)


def evaluate(
    model: Any,
    domains: Sequence[Domain],
    methods: Sequence[str] = ("ncc", "url", "copa"),
    protocol: str = "meta-dataset",
    num_episodes: int = 600,
    seed: int = 0,
    overrides: dict[str, dict[str, Any]] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    load_dataset: Callable[[Domain], Any] | None = None,
    model_name: str | None = None,
    sampling: str = "independent",
    shuffle_buffer_size: int = 0,
    image_processor: Any = None,
    num_workers: int = 0,
    mixed_precision: bool = True,
) -> EvaluationResult:
    """Evaluate `methods` on `num_episodes` episodes per domain, split across Accelerate processes.

    Episodes are drawn first, from the labels alone (`sampling`: see `domain_episodes`); then only the rows
    they touch are embedded (cached), and the episodes are dealt to the processes. `image_processor`
    overrides the model's own (e.g. `CopaImageProcessor(decoder="meta-dataset")` for Meta-Dataset's
    pixels); `num_workers` decode images in DataLoader workers; `mixed_precision=False` keeps feature
    extraction in float32 on CUDA. `model_name` labels the results (default: the name or path the model
    was loaded from).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = PartialState(cpu=use_cpu())
    overrides = overrides or {}
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise CopaValueError(f"Unknown method(s) {unknown}; choose from {available_methods()}.")
    check_int("num_episodes", num_episodes, 1)
    check_int("shuffle_buffer_size", shuffle_buffer_size, 0)
    source = EpisodeSource(
        model,
        protocol,
        num_episodes,
        seed,
        sampling,
        shuffle_buffer_size,
        load_dataset,
        image_processor,
        cache_dir,
        progress,
        num_workers,
        mixed_precision,
    )
    for domain in domains:  # a method the model cannot serve is refused before any image is read
        for method in methods:
            hp = hyperparameters_for(getattr(model, "config", None), domain, method, overrides)
            get_learner(method, **hp).check_model(model)
    on_backbone = {m: learner_class(m).needs_backbone for m in methods}
    accuracies: dict[str, dict[str, list[float]]] = {}
    used_hyperparameters: dict[str, dict[str, dict]] = {}
    embedded: dict[str, dict[str, int]] = {}
    for domain in domains:
        kinds = {learner_class(m).feature_kind for m in methods if not on_backbone[m]}
        dataset, episodes, features = source.domain(domain, kinds, state)
        if kinds:
            rows = len(rows_used(episodes))
            embedded[domain.name] = {"rows_embedded": rows, "rows_in_split": len(dataset)}
        chunks = episode_chunks(episodes)[state.process_index :: state.num_processes]
        singles = largest_first(episodes)[state.process_index :: state.num_processes]
        accuracies[domain.name] = {}
        used_hyperparameters[domain.name] = {}
        for method in methods:
            hp = hyperparameters_for(getattr(model, "config", None), domain, method, overrides)
            used_hyperparameters[domain.name][method] = hp
            local = []
            show = progress and state.is_main_process
            mine = len(singles) if on_backbone[method] else sum(len(c) for c in chunks)
            with tqdm(total=mine, unit="episode", desc=f"{domain.name} {method}", disable=not show) as bar:
                if on_backbone[method]:
                    images = source.images(dataset, domain)
                    with frozen_backbone(model, state.device):
                        for position in singles:
                            score = adapt_images_and_score(model, images, episodes[position], method, hp)
                            local.append((position, score))
                            bar.update(1)
                else:
                    for chunk in chunks:
                        chunk_episodes = [episodes[i] for i in chunk]
                        kind = learner_class(method).feature_kind
                        scores = adapt_and_score(
                            features[kind], chunk_episodes, method, hp, device=state.device
                        )
                        local += list(zip(chunk, scores, strict=True))
                        bar.update(len(chunk))
            gathered = gather_object(local) if state.num_processes > 1 else local
            accuracies[domain.name][method] = [acc for _, acc in sorted(gathered)]
    results, averages = summarise(accuracies, domains, methods)
    config = {
        "model": model_name
        or getattr(model, "name_or_path", None)
        or getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "methods": list(methods),
        "protocol": protocol,
        "episodes": num_episodes,
        "seed": seed,
        "sampling": sampling,
        **({"shuffle_buffer_size": shuffle_buffer_size} if sampling == "official" else {}),
        "decoder": getattr(source.processor, "decoder", None),
        "mixed_precision": mixed_precision and state.device.type == "cuda",
        "processes": state.num_processes,
        "domains": {d.name: {"path": d.path, "split": d.split, **embedded.get(d.name, {})} for d in domains},
        "roles": {d.name: d.role for d in domains},
        "hyperparameters": used_hyperparameters,
    }
    return EvaluationResult(results, averages, config, accuracies)
