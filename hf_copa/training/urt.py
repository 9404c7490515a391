"""Meta-training URT's layer on cached features of the training sources' episodes, under Accelerate.

The official recipe (liulu112601/URT `fast-scripts/urt-avg-head.sh`, `fast-exps/urt-avg-head.py`,
`exps/pre-extract-feature.py`), kept as defaults in `URTTrainingConfig`:

- 10,000 training episodes, each from one source: the first (ImageNet) with probability 0.5, otherwise one of
  the others uniformly (`pre-extract-feature.py` l. 115-118), Meta-Dataset's variable-way variable-shot
  protocol on the source's training split; features of every backbone, frozen, extracted once;
- one episode per step: cross-entropy of the queries under temperature * cos to the prototypes of the
  combined support features, plus 0.1 * ||Lambda^T Lambda - I||_F^2 (`urt-avg-head.py` l. 194-207);
- Adam, learning rate 1e-2, weight decay 1e-5 (on the temperature too, as the official parameter list holds
  it), cosine annealing over the run (`CosineAnnealingLR(T_max=max_iter)`, stepped every episode);
- 2 heads, hidden size 1024, attention temperature 1, classifier temperature initialised 10.

(`hf_copa.training.config.URTTrainingConfig` holds these defaults.)

Episodes are drawn before any image is touched, from `seed`, so every process count sees the same episodes
in the same order. With P processes, each step's `episodes_per_step` episodes are dealt to the processes and
DDP averages their gradients, which is the gradient of the step's mean loss: 1 and P processes train the
same layer (to float32 round-off; the gradients are averaged by `accelerator.reduce`, not DDP, so that the
layer needs no wrapper). The official run is `episodes_per_step=1` on one process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..distributed import use_cpu
from ..episodes import Episode, make_sampler
from ..evaluation import rows_used
from ..image_processing_copa import meta_dataset_processor
from ..learners.urt import URTLayer, head_diversity_penalty, save_urt_layer
from ..splits import SplitSpec, load_split
from ..validation import CopaValueError
from .config import URTTrainingConfig

URT_LOG_FILE = "urt_training_log.json"


@dataclass
class URTTrainingResult:
    output_dir: Path
    history: list[dict[str, Any]]
    seconds: float
    is_main_process: bool = True


def draw_training_episodes(
    datasets: Sequence[Any], config: URTTrainingConfig, sources: Sequence[SplitSpec] | None = None
) -> list[tuple[int, Episode]]:
    """(source index, episode) for every training episode, from the seed alone (no image is read).

    The source of each episode is drawn as `exps/pre-extract-feature.py` l. 116-119 draws it. Its episodes
    come from hf_copa's sampler (`config.sampling` "independent") or, for converted Meta-Dataset sources
    (`sources`: where each dataset was read), from Meta-Dataset's own (`hf_copa.meta_dataset.sampling`),
    with the ontologies and URT's shuffle buffer, as URT's `MetaDatasetEpisodeReader('train', [d], [d])`
    draws them one source at a time (`fast-exps/lib/data/meta_dataset_reader.py` l. 109-146)."""
    rng = np.random.default_rng(config.seed)
    choices = []
    for _ in range(config.episodes):
        if len(datasets) == 1 or rng.random() < config.first_source_probability:
            choices.append(0)
        else:
            choices.append(int(rng.integers(1, len(datasets))))
    counts = np.bincount(choices, minlength=len(datasets))
    if config.sampling == "official" and sources is None:
        raise CopaValueError("official sampling needs the converted sources the datasets were read from.")
    samplers = []
    for index, dataset in enumerate(datasets):
        seed, count = config.seed * 1009 + index, max(int(counts[index]), 1)
        if config.sampling == "official":
            from ..meta_dataset.sampling import official_sampler

            spec = sources[index]
            sampler = official_sampler(
                spec.path,
                spec.split,
                config.protocol,
                seed,
                count,
                config.shuffle_buffer_size,
                dataset=dataset,
            )
        else:
            sampler = make_sampler(
                config.protocol, dataset, label_column=config.label_column, seed=seed, num_episodes=count
            )
        samplers.append(sampler)
    drawn = [0] * len(datasets)
    episodes = []
    for source in choices:
        episodes.append((source, samplers[source].episode(drawn[source])))
        drawn[source] += 1
    return episodes


def episode_loss(
    layer: URTLayer, support, support_labels, query, query_labels, penalty: float
) -> torch.Tensor:
    """The official per-episode objective: query cross-entropy + penalty * head-diversity regulariser."""
    logits, weights = layer.episode_logits(support, support_labels, query)
    return F.cross_entropy(logits, query_labels) + penalty * head_diversity_penalty(weights)


def train_urt(
    backbone_set: Any,
    config: URTTrainingConfig,
    output_dir: str | Path,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    load_dataset: Callable[[str, str], Any] | None = None,
) -> URTTrainingResult:
    """Train URT's layer over `backbone_set`'s features of `config.sources`; write it to `output_dir`."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from ..features import extract_row_features

    config.check()
    accelerator = Accelerator(cpu=use_cpu())
    if config.episodes_per_step % accelerator.num_processes:
        raise CopaValueError(
            f"episodes_per_step ({config.episodes_per_step}) must be a multiple of the number of processes "
            f"({accelerator.num_processes}): each process takes an equal share of every step."
        )
    load = load_dataset or load_split
    specs = [SplitSpec.parse(source, default_split="train") for source in config.sources]
    datasets = [load(spec.path, spec.split) for spec in specs]
    episodes = draw_training_episodes(datasets, config, specs)
    processor = meta_dataset_processor(backbone_set) if config.decoder == "meta-dataset" else None
    features = []
    for index, dataset in enumerate(datasets):
        mine = [episode for source, episode in episodes if source == index]
        with accelerator.main_process_first():
            features.append(
                extract_row_features(
                    backbone_set,
                    dataset,
                    rows_used(mine) if mine else np.zeros(0, dtype=np.int64),
                    image_processor=processor,
                    image_column=config.image_column,
                    cache_dir=cache_dir,
                    progress=progress and accelerator.is_main_process,
                    device=accelerator.device,
                )
            )

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        layer = URTLayer(
            backbone_set.num_backbones,
            backbone_set.feature_dim,
            config.heads,
            config.hidden_dim,
            config.attention_temperature,
            config.temperature,
        )
    finally:
        torch.random.set_rng_state(generator_state)
    layer = layer.to(accelerator.device)
    optimizer = torch.optim.Adam(layer.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.episodes // config.episodes_per_step
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    share = config.episodes_per_step // accelerator.num_processes

    def tensors(source: int, episode: Episode):
        f = features[source]
        return (
            f[episode.support_indices].to(accelerator.device),
            torch.as_tensor(episode.support_labels, dtype=torch.long, device=accelerator.device),
            f[episode.query_indices].to(accelerator.device),
            torch.as_tensor(episode.query_labels, dtype=torch.long, device=accelerator.device),
        )

    history: list[dict[str, Any]] = []
    running: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(steps), desc="train-urt", disable=not (progress and accelerator.is_main_process))
    for step in bar:
        batch = episodes[step * config.episodes_per_step : (step + 1) * config.episodes_per_step]
        mine = batch[accelerator.process_index * share : (accelerator.process_index + 1) * share]
        loss = torch.stack([episode_loss(layer, *tensors(s, e), config.penalty) for s, e in mine]).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"The URT training loss became {loss.item()} at step {step + 1}; lower --lr ({config.lr})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if accelerator.num_processes > 1:  # the mean over every process's share: the step's gradient
            for parameter in layer.parameters():
                parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
        optimizer.step()
        scheduler.step()
        running.append(float(accelerator.gather(loss.detach()).mean()))
        done = step + 1
        if done % config.log_every == 0 or done == steps:
            record = {
                "step": done,
                "episodes": done * config.episodes_per_step,
                "loss": float(np.mean(running)),
                "lr": scheduler.get_last_lr()[0],
                "temperature": float(layer.temperature.detach()),
            }
            running = []
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
    seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    output = Path(output_dir)
    if accelerator.is_main_process:
        trained = layer.cpu()
        training = {
            **{k: v for k, v in asdict(config).items() if k not in ("image_column", "label_column")},
            "backbone_set_name": getattr(backbone_set, "name_or_path", None),
            "backbone_set_revision": getattr(backbone_set, "revision", None),
            "processes": accelerator.num_processes,
            "seconds": round(seconds, 2),
        }
        save_urt_layer(trained, output, backbone_set.identity(), training)
        (output / URT_LOG_FILE).write_text(json.dumps({"history": history, **training}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return URTTrainingResult(output, history, seconds, accelerator.is_main_process)
