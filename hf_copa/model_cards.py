"""The model card of a backbone trained by `hf-copa train`, with its evaluation as `model-index`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .configuration_copa import CopaConfig
from .modeling_copa import CopaModel
from .training.checkpoints import TRAINING_LOG_FILE

CARD_TEMPLATE = Path(__file__).parent / "assets" / "model_cards" / "trained_backbone.md"


def write_trained_model_card(
    folder: str | Path,
    evaluation: Mapping[str, Any] | str | Path | None = None,
    baseline: Mapping[str, Any] | str | Path | None = None,
    repo_id: str | None = None,
    evaluation_command: str | None = None,
    is_default: bool = False,
    training_notes: str | None = None,
    extra_evaluations: Sequence[tuple[Mapping[str, Any] | str | Path, str | None]] = (),
) -> Path:
    """Render `folder/README.md` from its `config.json` and `training_log.json`.

    `evaluation` / `baseline`: results JSON written by `hf-copa evaluate --output` (a path or its
    parsed dict) for this model and for its random-init twin; the former also becomes `model-index`.
    `extra_evaluations`: (results, command) of further evaluations (e.g. another episode protocol, or
    methods too costly for the main one), each a table of its own and part of `model-index`.
    `training_notes`: markdown added under "Training" (e.g. how an interrupted run was resumed).
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = CopaConfig.from_pretrained(folder)
    log_file = folder / TRAINING_LOG_FILE
    if not log_file.is_file():
        raise ValueError(f"{folder} has no {TRAINING_LOG_FILE}: it was not written by hf-copa train.")
    log = json.loads(log_file.read_text())
    training = log["config"]
    evaluation, baseline = _load_results(evaluation), _load_results(baseline)
    extras = [(_load_results(results), command) for results, command in extra_evaluations]
    model_index = [
        r for results in [evaluation, *(e for e, _ in extras)] if results for r in eval_results(results)
    ]
    repo_id = repo_id or folder.name
    domains = log.get("domains")
    if not domains:
        raise ValueError(f"{log_file} records no training domains; it was not written by hf-copa train.")
    val_names = [d["name"] for d in domains]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license="mit",
        tags=["hf_copa", "copa", "url", "few-shot", "meta-dataset", "image-feature-extraction"],
        datasets=[d["path"] if _is_hub_id(d["path"]) else d["name"] for d in domains],
        model_name=repo_id,
        eval_results=model_index or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        repo_id=repo_id,
        model_name=repo_id,
        is_default=is_default,
        training_notes=training_notes,
        teachers=sorted(training.get("teachers") or {}),
        depths=config.depths,
        hidden_sizes=config.hidden_sizes,
        embedding_size=config.embedding_size,
        stem_kernel_size=config.stem_kernel_size,
        stem_stride=config.stem_stride,
        image_size=config.image_size,
        feature_dim=config.feature_dim,
        num_parameters=f"{sum(p.numel() for p in CopaModel(config).parameters()):,}",
        weights_dtype=training["save_dtype"],
        domains=domains,
        command=training.get("command") or "(not recorded: trained through the Python API)",
        steps=log["steps"],
        momentum=training["momentum"],
        weight_decay=training["weight_decay"],
        lr=training["lr"],
        warmup_steps=training["warmup_steps"],
        batch_size=training["batch_size"],
        crop_padding_pixels=round(training["crop_padding"] * config.image_size),
        flip=training["flip"],
        seed=training["seed"],
        device=log["device"],
        processes=log["processes"],
        mixed_precision=log["mixed_precision"],
        minutes=f"{log['seconds'] / 60:.1f}",
        history=log["history"],
        val_names=val_names,
        val_episodes=training["val_episodes"],
        evaluation_summary=_summary(evaluation) if evaluation else None,
        evaluation_table=results_table(evaluation) if evaluation else None,
        baseline_table=results_table(baseline) if baseline else None,
        evaluation_command=evaluation_command,
        extra_evaluations=[
            {
                "protocol": results["config"]["protocol"],
                "summary": _summary(results),
                "table": results_table(results),
                "command": command,
            }
            for results, command in extras
        ],
    )
    path = folder / "README.md"
    card.save(path)
    return path


def eval_results(evaluation: Mapping[str, Any]) -> list[Any]:
    """One `huggingface_hub.EvalResult` per domain and method (accuracy in %, with its 95% CI)."""
    from huggingface_hub import EvalResult

    config = evaluation["config"]
    results = []
    for domain, per_method in evaluation["results"].items():
        role = config.get("roles", {}).get(domain)
        path = config["domains"][domain]["path"]
        for method, score in per_method.items():
            results.append(
                EvalResult(
                    task_type="image-classification",
                    task_name=f"Few-shot image classification ({config['protocol']} episodes)",
                    dataset_type=path if _is_hub_id(path) else domain,
                    dataset_name=f"{domain}{f' ({role} domain)' if role else ''}",
                    # The Hub groups metrics by (task, dataset, config, split): the episode protocol is the
                    # dataset "config" here, so that evaluations under several protocols stay apart.
                    dataset_config=config["protocol"],
                    dataset_split=config["domains"][domain]["split"],
                    metric_type="accuracy",
                    metric_value=round(score["mean"], 2),
                    metric_name=f"{method} (± {score['ci95']:.2f} 95% CI, {score['episodes']} episodes)",
                    metric_config=method,
                )
            )
    return results


def results_table(evaluation: Mapping[str, Any]) -> str:
    """Markdown: mean ± 95% CI per domain and method, then the seen / unseen / all averages."""
    from .evaluation import EvaluationResult

    return EvaluationResult(evaluation["results"], evaluation["averages"], evaluation["config"]).table()


def _summary(evaluation: Mapping[str, Any]) -> str:
    config = evaluation["config"]
    return (
        f"Accuracy (%, mean ± 95% confidence interval) over {config['episodes']} `{config['protocol']}` "
        f"episodes per domain (seed {config['seed']}) on each dataset's test split. Each method runs with "
        "its defaults except where the command below names one of the papers' presets (recorded per "
        "domain in the results JSON)."
    )


def _load_results(results: Mapping[str, Any] | str | Path | None) -> Mapping[str, Any] | None:
    if results is None or isinstance(results, Mapping):
        return results
    path = Path(results)
    if not path.is_file():
        raise ValueError(f"No evaluation results at {path}; write them with hf-copa evaluate --output.")
    return json.loads(path.read_text())


def _is_hub_id(path: str) -> bool:
    return not Path(path).exists() and path.count("/") <= 1 and not path.startswith((".", "/"))
