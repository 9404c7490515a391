"""Batched adaptation equals one-by-one; evaluation runs end to end and is process-count independent."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch

import hf_copa
from hf_copa.batching import MAX_EPISODES_PER_CHUNK, MAX_SUPPORT_ROWS_PER_CHUNK, episode_chunks, pad_episodes
from hf_copa.cli import main
from hf_copa.episodes import Episode, make_sampler
from hf_copa.evaluation import (
    Domain,
    adapt_and_score,
    adapt_one_by_one,
    confidence_interval,
    evaluate,
    parse_override,
)
from hf_copa.learners import get_learner

from .conftest import REPO_ROOT, tiny_backbone

SHARED_DOMAINS = {
    "omniglot": "seen",
    "tiny_imagenet": "seen",
    "mnist": "unseen",
    "fashion_mnist": "unseen",
    "cifar10": "unseen",
    "quickdraw": "unseen",
}


@pytest.fixture(scope="module")
def reference_episodes(reference_dir):
    """Reference episodes 0-3 (5-way 1-shot to 20-way, imbalanced shots) as one feature matrix plus Episodes.

    Batching is about padding and masking, which these exercise; the 259- and 500-support
    episodes would only make the float64 comparison slow.
    """
    ref = np.load(reference_dir / "copa_adaptation.npz")
    rows, episodes, offset = [], [], 0
    for i in range(4):
        support, query = ref[f"ep{i}_support"], ref[f"ep{i}_query"]
        support_rows = np.arange(offset, offset + len(support))
        query_rows = np.arange(offset + len(support), offset + len(support) + len(query))
        offset += len(support) + len(query)
        rows += [support, query]
        labels = ref[f"ep{i}_support_labels"]
        episodes.append(
            Episode(
                i, np.arange(labels.max() + 1), support_rows, labels, query_rows, ref[f"ep{i}_query_labels"]
            )
        )
    return torch.from_numpy(np.concatenate(rows)), episodes


@pytest.mark.parametrize("method", ["ncc", "url", "copa"])
def test_batched_adaptation_equals_one_by_one_in_float64(reference_episodes, method):
    features, episodes = reference_episodes
    features = features.double()
    support, labels, num_classes = pad_episodes(features, episodes)
    heads = get_learner(method).fit_batch(support, labels, num_classes)
    for head, episode in zip(heads, episodes, strict=True):
        single = get_learner(method).fit(
            features[episode.support_indices], torch.from_numpy(episode.support_labels)
        )
        query = features[episode.query_indices]
        torch.testing.assert_close(head.logits(query), single.logits(query), rtol=0, atol=1e-8)
        np.testing.assert_allclose(head.train_losses, single.train_losses, rtol=1e-9)


def test_batched_accuracies_equal_one_by_one_in_float32(reference_episodes):
    features, episodes = reference_episodes
    hp = get_learner("copa").hyperparameters
    assert adapt_and_score(features, episodes, "copa", hp) == adapt_one_by_one(features, episodes, "copa", hp)


def test_episode_chunks_cover_every_episode_once_within_bounds():
    rng = np.random.default_rng(0)
    episodes = [
        Episode(i, np.arange(2), np.arange(n), np.arange(n) % 2, np.arange(2), np.arange(2))
        for i, n in enumerate(rng.integers(2, 500, size=200))
    ]
    chunks = episode_chunks(episodes)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(200))
    for chunk in chunks:
        longest = max(len(episodes[i].support_indices) for i in chunk)
        assert len(chunk) <= MAX_EPISODES_PER_CHUNK
        assert len(chunk) == 1 or longest * len(chunk) <= MAX_SUPPORT_ROWS_PER_CHUNK
    assert chunks == episode_chunks(episodes)


def test_confidence_interval_is_1_96_std_over_sqrt_n():
    values = [0.5, 0.7, 0.9, 0.6]
    assert confidence_interval(values) == pytest.approx(1.96 * np.std(values) / math.sqrt(4))


def test_parsing_domains_and_overrides():
    assert Domain.parse("org/name:train") == Domain(name="name", path="org/name", split="train")
    assert Domain.parse("some/folder/").split == "test"
    assert parse_override("mnist:copa:preset=high-lr") == ("mnist", "copa", "preset", "high-lr")
    assert parse_override("url:lr=0.5") == (None, "url", "lr", 0.5)
    with pytest.raises(ValueError, match="METHOD:KEY=VALUE"):
        parse_override("copa.lr=3")
    with pytest.raises(ValueError, match="unknown method"):
        parse_override("nope:lr=3")


def small_split(path, num_classes=12, per_class=12):
    """A few classes of a shared dataset's evaluation split, read without decoding other images."""
    dataset = datasets.load_dataset(str(path), split="test")
    labels = np.asarray(dataset["label"])
    rows = [int(r) for c in np.unique(labels)[:num_classes] for r in np.flatnonzero(labels == c)[:per_class]]
    return dataset.select(rows)


def test_evaluate_end_to_end_on_every_shared_dataset(datasets_dir, tmp_path):
    torch.manual_seed(0)
    model = tiny_backbone()
    domains = [Domain(name, str(datasets_dir / name), role=role) for name, role in SHARED_DOMAINS.items()]
    domains[2].overrides = {"copa": {"preset": "high-lr"}}
    result = evaluate(
        model,
        domains,
        methods=["ncc", "url", "copa"],
        num_episodes=3,
        seed=1,
        overrides={"url": {"steps": 3}, "copa": {"steps": 3}},
        cache_dir=tmp_path,
        progress=False,
        load_dataset=lambda d: small_split(d.path),
    )
    assert set(result.results) == set(SHARED_DOMAINS)
    for per_method in result.results.values():
        for stats in per_method.values():
            assert stats["episodes"] == 3 and 0 <= stats["mean"] <= 100 and stats["ci95"] >= 0
    assert set(result.averages) == {"seen", "unseen", "all"}
    seen_ncc = np.mean([result.results[d]["ncc"]["mean"] for d in ("omniglot", "tiny_imagenet")])
    assert result.averages["seen"]["ncc"] == pytest.approx(seen_ncc, abs=1e-3)
    assert result.config["hyperparameters"]["mnist"]["copa"]["lr"] == 5e-3
    assert result.config["hyperparameters"]["cifar10"]["copa"]["lr"] == 1e-3
    assert "± " in result.table()
    saved = tmp_path / "results.json"
    result.save(saved)
    assert json.loads(saved.read_text())["results"]["mnist"]["copa"]["episodes"] == 3


@pytest.fixture(scope="module")
def tiny_model_and_dataset(tmp_path_factory, datasets_dir):
    root = tmp_path_factory.mktemp("evaluation")
    torch.manual_seed(0)
    tiny_backbone().save_pretrained(root / "model")
    data_dir = root / "quickdraw_small" / "data"
    data_dir.mkdir(parents=True)
    small_split(datasets_dir / "quickdraw", num_classes=6, per_class=15).to_parquet(
        str(data_dir / "test-00000-of-00001.parquet")
    )
    return root / "model", root / "quickdraw_small"


def evaluate_args(model_dir, dataset_dir, output, cache_dir):
    return [
        "evaluate",
        "--model",
        str(model_dir),
        "--dataset",
        str(dataset_dir),
        "--episodes",
        "10",
        "--method",
        "ncc",
        "copa",
        "tsa",
        "copa+tsa",
        "--override",
        "copa:steps=5",
        "--override",
        "tsa:steps=3",
        "--override",
        "copa+tsa:steps=3",
        "--output",
        str(output),
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
        "--per-episode",
    ]


def test_one_and_two_processes_write_identical_json(tiny_model_and_dataset, tmp_path):
    model_dir, dataset_dir = tiny_model_and_dataset
    single = tmp_path / "one.json"
    assert main(evaluate_args(model_dir, dataset_dir, single, tmp_path / "cache1")) == 0
    double = tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    # torchrun starts the processes; hf_copa tells Accelerate to use gloo on CPU when there is no GPU.
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "hf_copa.cli"]
    completed = subprocess.run(
        launch + evaluate_args(model_dir, dataset_dir, double, tmp_path / "cache2"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert (one["config"].pop("processes"), two["config"].pop("processes")) == (1, 2)
    assert one == two
    assert len(json.loads(double.read_text())["episode_accuracies"]["quickdraw_small"]["copa"]) == 10
    assert len(json.loads(double.read_text())["episode_accuracies"]["quickdraw_small"]["copa+tsa"]) == 10


CLOSING_PROBE = """
import sys
import torch.distributed as dist
from hf_copa.cli import main
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
code = main(sys.argv[2:])
print(code, dist.is_initialized())
"""


@pytest.mark.parametrize("succeeds", [True, False])
def test_the_cli_closes_a_launchs_process_group_on_success_and_on_error(
    tiny_model_and_dataset, tmp_path, succeeds
):
    """A rank left to close gloo at interpreter exit can abort ("terminate called without an active
    exception"); hf-copa closes the group itself, after a barrier only when the command succeeded."""
    model_dir, _ = tiny_model_and_dataset
    command = ["demo", "--model", str(model_dir)] if succeeds else ["demo", "--model", str(tmp_path / "none")]
    completed = subprocess.run(
        [sys.executable, "-c", CLOSING_PROBE, str(tmp_path / "store"), *command],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.splitlines()[-1] == ("0 False" if succeeds else "2 False")


def test_backbone_learners_are_scored_on_their_episodes_images(tiny_model_and_dataset, tmp_path):
    """TSA methods adapt on each episode's support images and score its queries through the adapters;
    with no feature method asked for, no split is embedded (the cache stays empty)."""
    model_dir, dataset_dir = tiny_model_and_dataset
    model = hf_copa.CopaModel.from_pretrained(model_dir)
    dataset = datasets.load_dataset(str(dataset_dir), split="test")
    result = evaluate(
        model,
        [Domain("small", str(dataset_dir))],
        methods=["tsa", "copa+tsa"],
        protocol="5-way-1-shot",
        num_episodes=3,
        overrides={"tsa": {"steps": 2}, "copa+tsa": {"steps": 2, "preset": "1-shot"}},
        cache_dir=tmp_path / "cache",
        progress=False,
        load_dataset=lambda domain: dataset,
    )
    assert not (tmp_path / "cache").exists()
    assert result.config["hyperparameters"]["small"]["copa+tsa"]["lr"] == 1e-4
    sampler = make_sampler("5-way-1-shot", dataset, seed=0, num_episodes=3)
    processor = model.default_image_processor()
    for method in ("tsa", "copa+tsa"):
        expected = []
        for i in range(3):
            episode = sampler.episode(i)
            support = processor([dataset[int(r)]["image"] for r in episode.support_indices])["pixel_values"]
            query = processor([dataset[int(r)]["image"] for r in episode.query_indices])["pixel_values"]
            learner = get_learner(method, **result.config["hyperparameters"]["small"][method])
            head = learner.fit_images(model, support, torch.from_numpy(episode.support_labels))
            logits = head.logits(model.extract_features(query, adapters=head.adapters))
            expected.append(float((logits.argmax(1).numpy() == episode.query_labels).mean()))
        assert result.episode_accuracies["small"][method] == pytest.approx(expected, abs=1e-6)


def test_evaluate_command_reports_bad_input_cleanly(tiny_model_and_dataset, capsys):
    model_dir, dataset_dir = tiny_model_and_dataset
    assert main(["evaluate", "--model", str(model_dir), "--dataset", str(dataset_dir), "--seen", "nope"]) == 2
    assert "not among the datasets" in capsys.readouterr().err


def test_average_rank_ranks_per_domain_and_ties_share_the_mean_rank():
    from hf_copa.evaluation import average_ranks

    def row(**means):
        return {m.replace("_", "+"): {"mean": v, "ci95": 0.0, "episodes": 1} for m, v in means.items()}

    results = {
        "a": row(ncc=50.0, copa=70.0, url=60.0),  # ranks 3, 1, 2
        "b": row(ncc=80.0, copa=80.001, url=40.0),  # ncc and copa shown equal (80.00): 1.5 each, url 3
    }
    ranks = average_ranks(results, ["ncc", "copa", "url"])
    assert ranks == {"ncc": (3 + 1.5) / 2, "copa": (1 + 1.5) / 2, "url": (2 + 3) / 2}
    assert sum(ranks.values()) == pytest.approx(2 * (1 + 2 + 3) / 2)  # each domain's ranks sum to 1+2+3
    assert all(math.isnan(v) for v in average_ranks({}, ["ncc", "copa"]).values())
