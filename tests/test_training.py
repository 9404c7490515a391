"""`hf-copa train`: data split and batches, augmentation, distillation losses, checkpoints and resume,
and the model folder it writes (loadable, with domain classifiers and a model card)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch

from hf_copa import CopaModel
from hf_copa.cli import main
from hf_copa.model_cards import write_trained_model_card
from hf_copa.training import (
    CHECKPOINTS_DIR,
    TrainingConfig,
    augment,
    batch_rows,
    cka_loss,
    load_trained_classifiers,
    logit_distillation_loss,
    split_domain,
    train,
)

from .conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_SHAPE = {"hidden_sizes": [4, 8, 8, 8], "embedding_size": 4, "image_size": 32}


def synthetic_domain(num_classes: int, per_class: int, seed: int) -> datasets.Dataset:
    """Small images whose class sets a colour and a stripe period, plus noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(num_classes):
        colour = rng.integers(0, 256, size=3)
        for _ in range(per_class):
            stripes = (np.arange(12) // (1 + label % 4)) % 2 * 80
            pixels = colour[None, None, :] * 0.6 + stripes[None, :, None] + rng.normal(0, 10, (12, 12, 3))
            images.append(np.clip(pixels, 0, 255).astype(np.uint8))
            labels.append(label)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=num_classes)}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


DOMAINS = {"shapes": synthetic_domain(12, 8, seed=1), "colours": synthetic_domain(10, 8, seed=2)}


def load_synthetic(path: str, split: str) -> datasets.Dataset:
    return DOMAINS[path]


def tiny_config(tmp_path, **overrides) -> TrainingConfig:
    settings = {
        "datasets": list(DOMAINS),
        "output_dir": str(tmp_path / "model"),
        "max_steps": 6,
        "batch_size": 8,
        "warmup_steps": 2,
        "lr": 0.05,
        "val_every": 3,
        "save_every": 3,
        "val_episodes": 4,
        "min_val_classes": 5,
        "num_workers": 0,
        **TINY_SHAPE,
    }
    return TrainingConfig(**{**settings, **overrides})


def test_batches_cover_every_row_once_per_epoch_and_split_across_processes():
    epoch = np.concatenate([batch_rows(20, 4, step, seed=0, salt=1) for step in range(5)])
    assert sorted(epoch) == list(range(20))
    assert not np.array_equal(epoch, batch_rows(20, 20, 1, seed=0, salt=1))  # epochs are reshuffled
    ranks = [batch_rows(20, 2, 3, seed=0, salt=1, rank=r, world=2) for r in range(2)]
    assert np.array_equal(np.concatenate(ranks), batch_rows(20, 4, 3, seed=0, salt=1))
    assert np.array_equal(batch_rows(20, 4, 7, 0, 1), batch_rows(20, 4, 7, 0, 1))  # a function of its args


def test_validation_classes_are_held_out_and_training_classes_relabelled():
    config = TrainingConfig(datasets=["shapes"], val_fraction=0.5)
    domain = split_domain("shapes", DOMAINS["shapes"], config)
    labels = np.asarray(DOMAINS["shapes"]["label"])
    assert len(np.unique(domain.val_labels)) == 6  # 50% of 12
    assert not set(domain.val_labels) & set(labels[domain.train_rows])
    assert sorted(domain.classes) == sorted(set(range(12)) - set(domain.val_labels))
    assert np.array_equal(np.asarray(domain.classes)[domain.train_labels], labels[domain.train_rows])
    again = split_domain("shapes", DOMAINS["shapes"], config)
    assert np.array_equal(again.val_rows, domain.val_rows)


def test_too_few_classes_to_hold_out_is_a_clear_error():
    config = TrainingConfig(datasets=["x"])
    with pytest.raises(ValueError, match="too few to hold out 5"):
        split_domain("x", synthetic_domain(6, 2, seed=0), config)


def test_augmentation_translates_and_flips_without_changing_the_shape():
    pixels = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    config = TrainingConfig(crop_padding=0.0, flip=False)
    assert torch.equal(augment(pixels, config, torch.Generator().manual_seed(0)), pixels)
    config = TrainingConfig(crop_padding=0.0, flip=True)
    flipped = augment(pixels, config, torch.Generator().manual_seed(0))
    for image, original in zip(flipped, pixels, strict=True):
        assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
    config = TrainingConfig(crop_padding=0.25, flip=False)
    shifted = augment(pixels, config, torch.Generator().manual_seed(3))
    assert shifted.shape == pixels.shape
    # A translation keeps each row's and column's step: interior pixels differ by 1 along a row.
    assert torch.all(shifted[..., 3:5, 3:5].diff(dim=-1).abs() <= 1)


def test_cka_loss_is_zero_for_related_features_and_positive_otherwise():
    features = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
    assert cka_loss(features, 3 * features @ rotation).item() == pytest.approx(0.0, abs=1e-5)
    unrelated = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
    assert cka_loss(features, unrelated).item() > 0.1


def test_logit_distillation_vanishes_when_the_student_matches_the_teacher():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    assert logit_distillation_loss(logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert logit_distillation_loss(logits, -logits, 2.0).item() > 0.1


def test_training_writes_a_loadable_model_with_classifiers_log_and_card(tmp_path):
    config = tiny_config(tmp_path, max_steps=30, save_every=100, val_every=15)
    result = train(config, load_dataset=load_synthetic, progress=False)
    folder = tmp_path / "model"
    model = CopaModel.from_pretrained(folder)
    assert model.config.hidden_sizes == TINY_SHAPE["hidden_sizes"]
    assert model.config.image_size == TINY_SHAPE["image_size"]
    heads, classes = load_trained_classifiers(folder)
    assert list(heads) == ["shapes", "colours"]
    assert [heads[name].out_features for name in heads] == [len(classes[name]) for name in heads]
    log = json.loads((folder / "training_log.json").read_text())
    assert [row["step"] for row in log["history"]] == [15, 30] == [row["step"] for row in result.history]
    first, last = log["history"]
    assert last["train_loss"] < first["train_loss"]  # it learns
    assert 0 <= last["val_ncc/mean"] <= 100
    assert not (folder / "README.md").exists()  # the caller writes the card (hf-copa train does)
    card = write_trained_model_card(folder).read_text()
    assert "shapes" in card and "30 steps" in card
    features = model.extract_features(torch.zeros(2, 3, 32, 32))
    assert features.shape == (2, 8) and torch.isfinite(features).all()


def fake_results(protocol: str, methods: list[str], offset: float) -> dict:
    """What `hf-copa evaluate --output` writes, for two domains."""
    results = {
        domain: {m: {"mean": 50.0 + offset + i, "ci95": 1.0, "episodes": 10} for i, m in enumerate(methods)}
        for domain in ("shapes", "colours")
    }
    averages = {"all": {m: 50.0 + offset + i for i, m in enumerate(methods)}}
    config = {
        "methods": methods,
        "protocol": protocol,
        "episodes": 10,
        "seed": 0,
        "roles": {"shapes": "seen", "colours": "unseen"},
        "domains": {d: {"path": d, "split": "test"} for d in results},
    }
    return {"results": results, "averages": averages, "config": config}


def test_the_card_shows_extra_evaluations_as_tables_and_model_index(tmp_path):
    from huggingface_hub import ModelCard

    train(tiny_config(tmp_path, max_steps=2), load_dataset=load_synthetic, progress=False)
    folder = tmp_path / "model"
    write_trained_model_card(
        folder,
        evaluation=fake_results("meta-dataset", ["ncc", "copa"], 0),
        extra_evaluations=[
            (fake_results("5-way-1-shot", ["copa", "tsa", "copa+tsa"], 10), "hf-copa evaluate X")
        ],
    )
    card = ModelCard.load(folder / "README.md")
    assert "| domain | role | ncc | copa |" in card.text
    assert "| domain | role | copa | tsa | copa+tsa |" in card.text
    assert "`5-way-1-shot` episodes" in card.text and "hf-copa evaluate X" in card.text
    results = card.data.eval_results
    assert len(results) == 2 * 2 + 2 * 3
    one_shot = [r for r in results if "5-way-1-shot" in r.task_name]
    assert sorted((r.dataset_type, r.metric_config) for r in one_shot) == sorted(
        (d, m) for d in ("shapes", "colours") for m in ("copa", "tsa", "copa+tsa")
    )


def test_hf_copa_model_card_writes_the_card_with_its_evaluations(tmp_path, capsys):
    train(tiny_config(tmp_path, max_steps=2), load_dataset=load_synthetic, progress=False)
    folder = tmp_path / "model"
    main_eval, extra = tmp_path / "eval.json", tmp_path / "one-shot.json"
    main_eval.write_text(json.dumps(fake_results("meta-dataset", ["ncc", "copa"], 0)))
    extra.write_text(json.dumps(fake_results("5-way-1-shot", ["copa", "tsa"], 10)))
    arguments = ["model-card", str(folder), "--evaluation", str(main_eval), "--repo-id", "org/tiny"]
    extras = ["--extra-evaluation", str(extra), "--extra-evaluation-command", "hf-copa evaluate Y"]
    assert main(arguments + extras) == 0
    card = (folder / "README.md").read_text()
    assert "org/tiny" in card and "| domain | role | copa | tsa |" in card and "hf-copa evaluate Y" in card
    assert f"wrote {folder / 'README.md'}" in capsys.readouterr().out
    assert main([*arguments, "--extra-evaluation-command", "orphan"]) == 2  # a command without results
    assert "More --extra-evaluation-command" in capsys.readouterr().err


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_run(tmp_path):
    straight = train(tiny_config(tmp_path / "a"), load_dataset=load_synthetic, progress=False)
    # An interrupted run: its step-3 checkpoint is all that survives of it.
    interrupted = tmp_path / "b" / "model"
    train(tiny_config(tmp_path / "b"), load_dataset=load_synthetic, progress=False)
    for item in interrupted.iterdir():
        if item.name != CHECKPOINTS_DIR:
            item.unlink()
    assert [p.name for p in (interrupted / CHECKPOINTS_DIR).iterdir()] == ["step-0000003"]
    resumed = train(tiny_config(tmp_path / "b"), resume=True, load_dataset=load_synthetic, progress=False)
    expected = CopaModel.from_pretrained(straight.output_dir).state_dict()
    got = CopaModel.from_pretrained(resumed.output_dir).state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert [r["step"] for r in resumed.history] == [3, 6]


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint found"):
        train(tiny_config(tmp_path), resume=True, load_dataset=load_synthetic, progress=False)


def test_distillation_from_a_single_domain_teacher(tmp_path):
    teacher = train(
        tiny_config(tmp_path / "teacher", datasets=["shapes"]), load_dataset=load_synthetic, progress=False
    )
    student = train(
        tiny_config(tmp_path / "student", teachers={"shapes": str(teacher.output_dir)}),
        load_dataset=load_synthetic,
        progress=False,
    )
    assert CopaModel.from_pretrained(student.output_dir).config.domain_classifier_domains == [
        "shapes",
        "colours",
    ]
    # A teacher whose held-out classes differ (another seed) cannot supervise these classes.
    with pytest.raises(ValueError, match="same --seed"):
        train(
            tiny_config(tmp_path / "other", seed=1, teachers={"shapes": str(teacher.output_dir)}),
            load_dataset=load_synthetic,
            progress=False,
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"datasets": []}, "at least one training dataset"),
        ({"max_steps": 0}, "max_steps must be a positive integer"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"val_fraction": 1.0}, "val_fraction must lie strictly between 0 and 1"),
        ({"teachers": {"birds": "x"}}, "not training domains"),
        ({"datasets": ["a/omniglot", "b/omniglot"]}, "share a name"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
        ({"min_val_classes": 3}, "at least 5 ways"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **overrides).check()


def test_cli_trains_from_dataset_folders_and_rejects_bad_teachers(tmp_path, capsys):
    for name, dataset in DOMAINS.items():
        dataset.to_parquet(str(tmp_path / name / "data" / "train-00000-of-00001.parquet"))
    shape = ["--hidden-sizes", "4", "8", "8", "8", "--embedding-size", "4", "--image-size", "32"]
    common = [
        "train", "--dataset", str(tmp_path / "shapes"), "--dataset", str(tmp_path / "colours"),
        "--output-dir", str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "4", "--val-episodes", "2",
        "--min-val-classes", "5", "--num-workers", "0", "--no-progress", *shape,
    ]  # fmt: skip
    assert main(common) == 0
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert log["config"]["command"].startswith("hf-copa train --dataset")
    assert "--max-steps 2" in (tmp_path / "out" / "README.md").read_text()
    assert main([*common, "--teacher", "shapes"]) == 2
    assert "use DOMAIN=MODEL_FOLDER" in capsys.readouterr().err


def test_two_processes_train_under_torchrun(tmp_path):
    """torchrun (DDP over gloo on CPU): each process takes its share of every step's batch."""
    for name, dataset in DOMAINS.items():
        dataset.to_parquet(str(tmp_path / name / "data" / "train-00000-of-00001.parquet"))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "hf_copa.cli"]
    args = [
        "train", "--dataset", str(tmp_path / "shapes"), "--dataset", str(tmp_path / "colours"),
        "--output-dir", str(tmp_path / "out"), "--max-steps", "4", "--save-every", "2", "--val-every", "2",
        "--batch-size", "4", "--val-episodes", "2", "--num-workers", "0", "--no-progress",
        "--hidden-sizes", "4", "8", "8", "8", "--embedding-size", "4", "--image-size", "32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert log["processes"] == 2 and [row["step"] for row in log["history"]] == [2, 4]
    assert (tmp_path / "out" / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()
    CopaModel.from_pretrained(tmp_path / "out")
