"""Converted Meta-Dataset sources through `hf-copa evaluate`: today's sampling, the official episodes, the
Meta-Dataset decoder's pixels into the backbone, only the rows the episodes use, and the paper's benchmark."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_copa.cli import main
from hf_copa.image_processing_copa import CopaImageProcessor
from hf_copa.meta_dataset import convert_records, official_sampler
from hf_copa.validation import CopaValueError
from tests.support.meta_dataset_fixtures import benchmark_layout

from .conftest import REPO_ROOT, tiny_backbone

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def converted(reference_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("converted")
    convert_records(reference_dir / "meta_dataset" / "records", output, progress=False)
    return output


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    tiny_backbone().save_pretrained(folder)
    return folder


def evaluate(model_dir, *arguments, output: Path) -> dict:
    base = ["evaluate", "--model", str(model_dir), "--method", "ncc", "copa", "--override", "copa:steps=3"]
    assert main([*base, *arguments, "--no-progress", "--output", str(output)]) == 0
    return json.loads(output.read_text())


def test_evaluate_runs_on_a_converted_source_with_todays_sampling(converted, model_dir, tmp_path):
    results = evaluate(
        model_dir,
        "--dataset",
        str(converted / "md_plain"),
        "--episodes",
        "5",
        "--cache-dir",
        "none",
        output=tmp_path / "r.json",
    )
    assert results["results"]["md_plain"]["copa"]["episodes"] == 5
    assert results["config"]["sampling"] == "independent" and results["config"]["decoder"] == "pil"


def test_official_sampling_evaluates_the_official_episodes_and_embeds_only_their_rows(
    converted, model_dir, tmp_path
):
    source = converted / "md_plain"
    arguments = [
        "--dataset",
        str(source),
        "--episodes",
        "6",
        "--sampling",
        "official",
        "--protocol",
        "5-way-1-shot",
    ]
    results = evaluate(
        model_dir, *arguments, "--cache-dir", str(tmp_path / "cache"), output=tmp_path / "o.json"
    )
    sampler = official_sampler(source, protocol="5-way-1-shot", num_episodes=6)
    domain = results["config"]["domains"]["md_plain"]
    assert results["config"]["sampling"] == "official" and results["config"]["shuffle_buffer_size"] == 0
    assert domain["rows_embedded"] == len(sampler.rows_used()) < domain["rows_in_split"] == 422
    assert results["results"]["md_plain"]["ncc"]["episodes"] == 6
    with pytest.raises(SystemExit):
        main(["evaluate", "--dataset", str(source), "--shuffle-buffer-size", "-"])
    assert main(["evaluate", "--dataset", str(source), "--shuffle-buffer-size", "10", "--episodes", "2"]) == 2


def test_the_meta_dataset_decoder_feeds_tensorflows_pixels_to_the_backbone(converted, reference_dir):
    import datasets

    from hf_copa.features import extract_row_features

    decoded = np.load(reference_dir / "meta_dataset" / "decoded.npz")
    split = datasets.load_dataset(str(converted / "md_plain"), split="test")
    index = {
        (int(c), int(r)): row
        for row, (c, r) in enumerate(zip(split["label"], split["record_index"], strict=True))
    }
    rows = [index[(int(c), int(r))] for c, r in decoded["md_plain_records"]]
    model = tiny_backbone(image_size=84)
    processor = CopaImageProcessor(decoder="meta-dataset")
    features = extract_row_features(model, split, rows, image_processor=processor, progress=False)
    pixels = torch.from_numpy(decoded["md_plain_images"]).permute(0, 3, 1, 2)
    expected = model.extract_features(pixels)
    torch.testing.assert_close(features[rows], expected, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def benchmark_root(converted, tmp_path_factory) -> Path:
    return benchmark_layout(converted, tmp_path_factory.mktemp("root") / "converted")


def test_the_benchmark_runs_what_it_finds_with_the_papers_settings(
    benchmark_root, model_dir, tmp_path, capsys
):
    arguments = ["--benchmark", "meta-dataset", "--data-root", str(benchmark_root), "--episodes", "4"]
    results = evaluate(model_dir, *arguments, "--cache-dir", "none", output=tmp_path / "b.json")
    config = results["config"]
    assert list(results["results"]) == ["ilsvrc_2012", "omniglot", "dtd", "mnist"]  # the benchmark's order
    assert config["roles"] == {"ilsvrc_2012": "seen", "omniglot": "seen", "dtd": "seen", "mnist": "unseen"}
    assert (
        config["sampling"] == "official" and config["decoder"] == "meta-dataset" and config["paper_settings"]
    )
    assert config["hyperparameters"]["mnist"]["copa"]["lr"] == 5e-3  # high-lr on MNIST
    assert config["hyperparameters"]["dtd"]["copa"]["lr"] == 1e-3
    assert set(results["averages"]) == {"seen", "unseen", "all"}
    err = capsys.readouterr().err
    assert "Not found under" in err and "aircraft" in err and "cifar100" in err
    assert main(["evaluate", "--benchmark", "meta-dataset", "--data-root", str(tmp_path)]) == 2
    assert "No converted Meta-Dataset source" in capsys.readouterr().err


def test_the_benchmark_runs_sur_and_urt_on_a_backbone_set(benchmark_root, tmp_path):
    """The paper's first table's several-backbone rows: a set, the official episodes and decoder, SUR's
    official settings and a URT layer meta-trained on the set's features of a training source."""
    from tests.test_backbone_set import make_set

    make_set().save_pretrained(tmp_path / "set")
    train = ["train-urt", "--model", str(tmp_path / "set"), "--benchmark", "meta-dataset", "--data-root"]
    train += [str(benchmark_root), "--episodes", "4", "--output", str(tmp_path / "urt"), "--no-progress"]
    assert main([*train, "--cache-dir", "none"]) == 0
    training = json.loads((tmp_path / "urt" / "urt_config.json").read_text())["training"]
    assert [Path(s).name for s in training["sources"]] == ["ilsvrc_2012:train", "omniglot:train", "dtd:train"]
    assert (training["sampling"], training["decoder"], training["shuffle_buffer_size"]) == (
        "official",
        "meta-dataset",
        1000,
    )
    arguments = ["--model", str(tmp_path / "set"), "--benchmark", "meta-dataset", "--data-root"]
    arguments += [str(benchmark_root), "--episodes", "2", "--method", "sur", "urt", "--urt-head"]
    arguments += [str(tmp_path / "urt"), "--cache-dir", "none", "--no-progress", "--per-episode"]
    for setting in ("all-sources", "imagenet-only"):
        output = tmp_path / f"{setting}.json"
        assert main(["evaluate", *arguments, "--setting", setting, "--output", str(output)]) == 0
        results = json.loads(output.read_text())
        assert list(results["results"]) == ["ilsvrc_2012", "omniglot", "dtd", "mnist"]
        assert results["config"]["setting"] == setting and results["config"]["sampling"] == "official"
        sur = results["config"]["hyperparameters"]["omniglot"]["sur"]
        assert sur == {"steps": 40, "lr_times_classes": 3000.0, "scale": 10.0}
        assert all(len(results["episode_accuracies"][d]["urt"]) == 2 for d in results["results"])
        assert set(results["average_rank"]) == {"sur", "urt"}


def test_urt_training_episodes_are_meta_datasets_own_on_the_train_splits(
    benchmark_root, tmp_path, monkeypatch
):
    """With official sampling each source's training episodes are those of Meta-Dataset's sampler on its
    train split (the ontologies on, URT's shuffle buffer), and the features are TensorFlow's pixels'."""
    import datasets

    import hf_copa.features
    from hf_copa.splits import SplitSpec
    from hf_copa.training import urt as urt_training
    from hf_copa.training.config import URTTrainingConfig
    from tests.test_backbone_set import make_set

    names = ["ilsvrc_2012", "omniglot", "dtd"]
    specs = [SplitSpec.parse(f"{benchmark_root / n}:train", default_split="train") for n in names]
    splits = [datasets.load_dataset(str(benchmark_root / n), split="train") for n in names]
    config = URTTrainingConfig(
        sources=[f"{s.path}:train" for s in specs], episodes=12, sampling="official", seed=3
    )
    drawn = urt_training.draw_training_episodes(splits, config, specs)
    for index, name in enumerate(names):
        mine = [episode for source, episode in drawn if source == index]
        assert mine, name
        sampler = official_sampler(
            benchmark_root / name, "train", "meta-dataset", 3 * 1009 + index, len(mine), 1000
        )
        assert mine == [sampler.episode(i) for i in range(len(mine))]
    omniglot = [episode for source, episode in drawn if source == 1]
    assert all(episode.hierarchy_node is not None for episode in omniglot)  # one alphabet per episode

    processors = []
    original = hf_copa.features.extract_row_features

    def spy(model, dataset, rows, image_processor=None, *args, **kwargs):
        processors.append(image_processor)
        return original(model, dataset, rows, image_processor, *args, **kwargs)

    monkeypatch.setattr(hf_copa.features, "extract_row_features", spy)
    with pytest.raises(CopaValueError, match="official sampling needs the converted sources"):
        urt_training.draw_training_episodes(splits, config)
    config.decoder, config.episodes = "meta-dataset", 2
    urt_training.train_urt(make_set(), config, tmp_path / "urt", progress=False)
    assert processors and all(p.decoder == "meta-dataset" for p in processors)


def test_train_urt_benchmark_options_are_checked(benchmark_root, tmp_path, capsys):
    base = ["train-urt", "--model", str(tmp_path / "set"), "--output", str(tmp_path / "out")]
    cases = [
        ([*base, "--benchmark", "meta-dataset"], "takes the converted sources from --data-root"),
        (
            [*base, "--benchmark", "meta-dataset", "--data-root", str(benchmark_root), "--dataset", "x"],
            "not --dataset",
        ),
        ([*base, "--dataset", "x", "--data-root", str(benchmark_root)], "--data-root goes with --benchmark"),
        (
            [*base, "--benchmark", "meta-dataset", "--data-root", str(tmp_path)],
            "No converted Meta-Dataset source",
        ),
        (base, r"at least one training source \(--dataset PATH, or --benchmark"),
    ]
    for command, message in cases:
        assert main(command) == 2, command
        assert re.search(message, capsys.readouterr().err), message
    from hf_copa.training.config import URTTrainingConfig

    with pytest.raises(CopaValueError, match="sampling must be one of independent, official"):
        URTTrainingConfig(sources=["x"], sampling="tf").check()


def test_one_and_two_processes_give_the_same_official_results(converted, model_dir, tmp_path):
    def arguments(output: Path) -> list[str]:
        return [
            "evaluate",
            "--model",
            str(model_dir),
            "--dataset",
            str(converted / "md_bilevel"),
            "--sampling",
            "official",
            "--episodes",
            "6",
            "--method",
            "ncc",
            "copa",
            "--override",
            "copa:steps=3",
            "--cache-dir",
            "none",
            "--no-progress",
            "--per-episode",
            "--output",
            str(output),
        ]

    assert main(arguments(tmp_path / "one.json")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "hf_copa.cli"]
    completed = subprocess.run(
        launch + arguments(tmp_path / "two.json"), env=env, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert two["config"]["processes"] == 2
    assert one["episode_accuracies"] == two["episode_accuracies"] and one["results"] == two["results"]


def test_analyze_runs_the_benchmark_on_the_official_episodes_with_the_papers_settings(
    benchmark_root, model_dir, tmp_path
):
    """`hf-copa analyze --benchmark`: the same domains, official episodes, decoder and settings as evaluate,
    and the same accuracy on every episode."""
    common = ["--model", str(model_dir), "--benchmark", "meta-dataset", "--data-root", str(benchmark_root)]
    common += ["--episodes", "2", "--method", "url", "copa", "--override", "copa:steps=3", "--no-progress"]
    common += ["--cache-dir", "none"]
    assert (
        main(["analyze", *common, "--cluster-map", "pca", "--no-trace", "--output", str(tmp_path / "a")]) == 0
    )
    analysis = json.loads((tmp_path / "a" / "analysis.json").read_text())
    config = analysis["config"]
    assert list(analysis["summary"]) == ["ilsvrc_2012", "omniglot", "dtd", "mnist"]
    assert (
        config["sampling"] == "official" and config["decoder"] == "meta-dataset" and config["paper_settings"]
    )
    assert config["hyperparameters"]["mnist"]["copa"]["lr"] == 5e-3
    assert main(["evaluate", *common, "--per-episode", "--output", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())["episode_accuracies"]
    for domain, per_method in analysis["episodes"].items():
        for method, records in per_method.items():
            assert [r["accuracy"] for r in records] == pytest.approx(
                [100 * a for a in evaluated[domain][method]]
            )


def test_the_imagenet_only_setting_sees_imagenet_alone_with_the_official_sdl_rates(
    benchmark_root, model_dir, tmp_path, capsys
):
    """`--setting imagenet-only` is the official `--test.mode sdl`: trainsets = ['ilsvrc_2012'] (URL's
    test_extractor_pa.py l. 37-42, test_extractor_tsa.py l. 42-47; CoPA's copa_pa.py l. 32-35)."""
    arguments = ["--benchmark", "meta-dataset", "--data-root", str(benchmark_root), "--episodes", "2"]
    arguments += ["--setting", "imagenet-only", "--cache-dir", "none"]
    base = ["evaluate", "--model", str(model_dir), "--method", "ncc", "url", "proto-maml", "copa"]
    base += ["--override", "copa:steps=3", "--override", "url:steps=3", "--no-progress"]
    assert main([*base, *arguments, "--output", str(tmp_path / "i.json")]) == 0
    results = json.loads((tmp_path / "i.json").read_text())
    config = results["config"]
    assert config["setting"] == "imagenet-only" and config["paper_settings"]
    assert config["roles"] == {
        "ilsvrc_2012": "seen",
        "omniglot": "unseen",
        "dtd": "unseen",
        "mnist": "unseen",
    }
    hyperparameters = config["hyperparameters"]
    assert (
        hyperparameters["ilsvrc_2012"]["url"]["lr"] == 0.1 and hyperparameters["omniglot"]["url"]["lr"] == 1.0
    )
    assert hyperparameters["dtd"]["proto-maml"]["lr"] == pytest.approx(0.005435022808033229)
    assert hyperparameters["mnist"]["copa"]["lr"] == 5e-3  # by name, as in both settings
    assert set(results["averages"]) == {"seen", "unseen", "all"}
    assert "average rank" in capsys.readouterr().out
    from hf_copa.cli import build_parser
    from hf_copa.meta_dataset.benchmark import SETTINGS

    evaluate_parser = build_parser()._subparsers._group_actions[0].choices["evaluate"]
    setting_flag = next(a for a in evaluate_parser._actions if a.dest == "setting")
    assert tuple(setting_flag.choices) == SETTINGS  # the CLI's literal list (it imports no torch) is the same
    assert main(["evaluate", "--dataset", str(benchmark_root / "mnist"), "--setting", "imagenet-only"]) == 2
    assert "add --benchmark meta-dataset or --paper-settings" in capsys.readouterr().err
