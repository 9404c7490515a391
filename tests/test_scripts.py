"""Every script in scripts/ runs as `python scripts/NAME.py --quick` from the repository root after
`pip install -e .`, with no PYTHONPATH, and writes its normal output (its --json file) with real figures.

Each script runs in a subprocess at one thread (OMP_NUM_THREADS=1; --threads 1 where the script has it).
Scripts that read ../shared (or $HF_COPA_SHARED) skip without it locally and fail in CI (CI=true).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, SHARED_DIR, shared_path, unavailable

SCRIPTS_DIR = REPO_ROOT / "scripts"
TIMEOUT_S = 300  # each takes seconds to ~1 minute on one thread; this only stops a hung script


def numbers(value) -> list[float]:
    """Every int and float in a JSON value (bools excluded), depth first."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    items = value.values() if isinstance(value, dict) else value
    return [x for item in items for x in numbers(item)]


# --- what each script is given and what its output must show --------------------------------------------


def check_adaptation(out: dict) -> None:
    assert out["machine"]["quick"] is True and out["machine"]["repeats"] == 1
    assert out["machine"]["matmul_peak_gflops"] > 0
    rows = out["rows"]
    methods = ["copa", "copa (official-style)", "url", "finetune", "proto-maml", "mahalanobis"]
    assert [(r["method"], r["episode"]) for r in rows] == [(m, 0) for m in [*methods, "copa-transformer"]]
    assert all(r["ms_per_episode"] > 0 for r in rows)
    assert all((r["gflops_per_s"] is None) == (r["method"] == "mahalanobis") for r in rows)
    assert all(r["speedup_vs_official_style"] > 0 for r in rows if r["method"] == "copa")
    if out["machine"]["episodes"].startswith("reference episodes"):  # ../shared/reference was found
        checked = [r for r in rows if r["max_abs_logit_diff"] is not None]
        assert {r["method"] for r in checked} == {"copa", "copa (official-style)", "url"}
        assert all(r["max_abs_logit_diff"] < 1e-2 for r in checked), rows


def check_evaluation(out: dict) -> None:
    assert out["quick"] is True and out["images"] == 500 and out["episodes"] == 10
    assert out["cache_fill_s"] > 0 and out["batched_adapt_s"] > 0 and out["one_by_one_adapt_s"] > 0
    assert 0 < out["accuracy_mean"] <= 100 and out["mean_ways"] >= 2
    assert out["identical_accuracies"] is True and out["episodes_differing"] == 0


def check_meta_dataset(out: dict) -> None:
    assert out["quick"] is True
    assert out["source"]["records"] == 1000 and out["source"]["bytes"] > 0
    assert out["source_small"]["records"] == 100
    for conversion in (out["conversion"], out["conversion_small"]):
        assert conversion["seconds"] > 0 and conversion["shards"] > 0 and conversion["peak_rss_mib"] > 0
    assert out["parse"]["records"] == 1000
    assert out["parse"]["direct_us_per_record"] > 0 and out["parse"]["protobuf_us_per_record"] > 0
    assert out["decode"]["images"] == 256
    assert set(out["decode"]["workers=1"]) == {"meta-dataset", "CopaImageProcessor"}
    assert all(v > 0 for v in out["decode"]["workers=1"].values())


def check_official_episodes(out: dict) -> None:
    assert out["quick"] is True
    assert set(out["sampler"]) == {
        f"{source} meta-dataset" for source in ("md_plain", "md_bilevel", "md_dag", "generated_52x100")
    }
    for cell in out["sampler"].values():
        assert cell["seconds"] > 0 and 0 < cell["rows_embedded"] <= cell["rows_in_split"]
    assert out["sampler"]["generated_52x100 meta-dataset"]["rows_in_split"] == 52 * 100
    end_to_end = out["end_to_end"]
    assert end_to_end["seconds"] > 0 and "--episodes 5" in end_to_end["command"]
    for domain in ("ilsvrc_2012", "omniglot", "dtd", "mnist"):
        assert f"| {domain} |" in end_to_end["table"]


def check_space(out: dict) -> None:
    assert out["environment"]["quick"] is True and out["environment"]["repeats"] == 1
    rows = out["rows"]
    assert [(r["task"], r["method"], r["threads"]) for r in rows] == [
        ("quickdraw", "copa", 1),
        ("quickdraw", "url", 1),
    ]
    for row in rows:
        assert row["support"] > 0 and row["queries"] > 0
        assert 0 < row["adaptation_s"] <= row["run_s"]


def check_tsa(out: dict) -> None:
    assert out["hardware"]["quick"] is True and out["hardware"]["threads"] == 1
    rows = out["rows"]
    assert [(r["model"], r["episode"], r["method"]) for r in rows] == [
        ("copa-mdl-small", "5-way 1-shot", method)
        for method in ("copa", "tsa", "copa+tsa", "finetune-all", "proto-maml-all")
    ]
    for row in rows:
        assert row["support"] == 5 and row["query"] == 75
        assert row["seconds_median"] > 0 and len(row["seconds"]) == 1


def check_tsa_fidelity(out: dict) -> None:
    assert out["quick"] is True
    rows = out["rows"]
    assert [(r["method"], r["setting"], r["episode"]) for r in rows] == [
        ("tsa", "seen", 0),
        ("copa+tsa", "default", 0),
    ]
    for row in rows:
        assert len(row["max_abs_logit_diff_to_reference"]) == 6
        # The official algorithm in float64: hf_copa's learner and the transcription agree (1 step).
        assert row["float64_vs_transcription"] < 1e-6
    losses = rows[1]["max_rel_loss_diff_to_reference"]  # the reference's first loss
    assert max(losses.values()) < 1e-3, losses


def check_gpu(out: dict) -> None:
    from hf_copa.learners import available_methods, learner_class

    assert out["quick"] is True and out["device"]["type"] == "cpu" and out["protocol"] == "5-way-1-shot"
    feature_learners = [
        m
        for m in available_methods()
        if not learner_class(m).needs_backbone and learner_class(m).feature_kind != "backbones"
    ]
    assert [r["method"] for r in out["learners"]] == feature_learners
    for row in out["learners"]:
        assert row["seconds_per_episode_batched"] > 0 and row["seconds_per_episode_one_by_one"] > 0
        assert row["max_abs_logit_diff_vs_cpu"] == 0.0  # --device cpu: the same arithmetic twice
    copa = next(r for r in out["learners"] if r["method"] == "copa")
    assert copa["projected_meta_dataset_seconds"] == pytest.approx(7800 * copa["seconds_per_episode_batched"])
    assert {(r["model"], r["channels_last"]) for r in out["extraction"]} == {
        (m, c) for m in ("default", "copa-mdl-small", "url-resnet18") for c in (False, True)
    }
    assert all(r["images_per_s"] > 0 for r in out["extraction"]) and out["tsa"]["seconds_per_episode"] > 0
    assert out["matmul_peak_gflops"]["float32"] > 0


def check_backbone_set(out: dict) -> None:
    assert out["machine"]["quick"] is True and out["machine"]["threads"] == 1
    assert [r["method"] for r in out["rows"]] == ["copa", "sur", "urt", "urt (training step)"]
    assert all(r["ms_per_episode"] > 0 for r in out["rows"]) and out["rows"][1]["backbones"] == 3
    cache = out["cache"]
    assert 2048 <= cache["bytes_per_row_per_backbone"] < 2200  # 512 float32 values (+ the row number)
    assert cache["disk_gb_1m_rows"] == pytest.approx(
        cache["bytes_per_row_per_backbone"] * 3e6 / 1e9, rel=1e-2
    )
    urt = out["urt_training"]
    assert set(urt["processes"]) == {"1", "2"} and urt["same_losses"] is True
    assert urt["max_abs_layer_difference"] < 1e-5


def check_sdl_standins(out: dict) -> None:
    from hf_copa.conversion import URL_TRAINING_DOMAINS, load_url_checkpoint

    assert out["quick"] is True and out["width"] == 4 and list(out["files"]) == list(URL_TRAINING_DOMAINS)
    for source, entry in out["files"].items():
        checkpoint = load_url_checkpoint(entry["path"])  # the converter's own reading: URL's sdl layout
        assert checkpoint.training_domains == (source,) and checkpoint.domain_classifier_sizes[0] > 0


def check_backbones(out: dict) -> None:
    assert out["machine"]["quick"] is True and out["machine"]["threads"] == 1
    settings = out["settings"]
    assert settings["episodes"] == 3 and settings["methods"] == ["ncc", "url", "copa"]
    assert {name: d["rows"] for name, d in settings["datasets"].items()} == {"mnist": 300, "quickdraw": 300}
    assert list(settings["protocols"]) == ["5-way-5-shot", "meta-dataset"]
    fixed = settings["protocols"]["5-way-5-shot"]
    assert [fixed[k] for k in ("sampler", "num_ways", "num_support", "num_query")] == ["fixed", 5, 5, 15]
    assert settings["overrides"] == ["mnist:copa:preset=high-lr"]  # the others name datasets not in the run
    backbones = out["backbones"]
    assert list(backbones) == ["efficientnet-lite0 84px", "url-resnet18 (random weights)"]
    keys = ("model_class", "image_size", "feature_dim", "stand_in")
    shapes = [[b[k] for k in keys] for b in backbones.values()]
    assert shapes == [["EfficientNetLiteModel", 84, 1280, False], ["CopaModel", 84, 512, True]]
    for name, backbone in backbones.items():
        assert backbone["extraction"]["images"] == 32 and backbone["extraction"]["images_per_s"] > 0
        assert list(backbone["datasets"]) == ["mnist", "quickdraw"]
        for dataset in backbone["datasets"].values():
            assert 0 < dataset["rows_embedded"] <= 300 and dataset["embedding_s"] > 0
            assert list(dataset["protocols"]) == ["5-way-5-shot", "meta-dataset"]
            for protocol, per_method in dataset["protocols"].items():
                assert list(per_method) == ["ncc", "url", "copa"]
                for result in per_method.values():
                    assert 0 <= result["mean"] <= 100 and result["ci95"] >= 0 and result["episodes"] == 3
                    assert result["adapt_s_per_episode"] > 0
                    if protocol == "5-way-5-shot":
                        shape = [result[k] for k in ("mean_ways", "mean_support", "mean_query")]
                        assert shape == [5, 25, 75]
        for protocol in ("5-way-5-shot", "meta-dataset"):
            for method in ("ncc", "url", "copa"):
                means = [d["protocols"][protocol][method]["mean"] for d in backbone["datasets"].values()]
                assert backbone["average"][protocol][method] == pytest.approx(sum(means) / 2)
        assert f"| {name}{' *' if backbone['stand_in'] else ''} | mnist |" in out["table"]
    # Every backbone saw the same episodes: the same shapes, whatever the features.
    first, second = (b["datasets"]["mnist"]["protocols"]["meta-dataset"]["ncc"] for b in backbones.values())
    assert (first["mean_ways"], first["mean_support"]) == (second["mean_ways"], second["mean_support"])
    assert "RANDOM weights" in out["table"]
    assert "stand-in" in backbones["url-resnet18 (random weights)"]["note"]


@dataclass(frozen=True)
class Case:
    args: Callable[[Path], list[str]]  # the arguments after --quick, given the output file
    check: Callable[[dict], None]
    shared: tuple[str, ...] = ()  # folders of ../shared it needs (else skipped, or failed in CI)


CASES: dict[str, Case] = {
    "benchmark_adaptation": Case(
        # The reference episodes when ../shared has them (the script falls back to random ones).
        lambda out: ["--threads", "1", "--reference-dir", str(SHARED_DIR / "reference"), "--json", str(out)],
        check_adaptation,
    ),
    "benchmark_backbone_set": Case(lambda out: ["--threads", "1", "--json", str(out)], check_backbone_set),
    "benchmark_backbones": Case(
        lambda out: (
            ["--threads", "1", "--data-root", str(SHARED_DIR / "datasets"), "--json", str(out)]
            + ["--url-checkpoint", str(SHARED_DIR / "reference" / "url_checkpoint.pth.tar.xz")]
        ),
        check_backbones,
        shared=("datasets", "reference"),
    ),
    "benchmark_evaluation": Case(
        lambda out: ["--dataset", str(SHARED_DIR / "datasets" / "mnist"), "--json", str(out)],
        check_evaluation,
        shared=("datasets",),
    ),
    "benchmark_meta_dataset": Case(lambda out: ["--json", str(out)], check_meta_dataset),
    # Reads ../shared/reference/meta_dataset/records next to the repository (it has no flag for it).
    "benchmark_official_episodes": Case(lambda out: ["--json", str(out)], check_official_episodes),
    "benchmark_space": Case(lambda out: ["--json", str(out)], check_space),
    "benchmark_tsa": Case(lambda out: ["--threads", "1", "--json", str(out)], check_tsa),
    "make_sdl_standins": Case(
        lambda out: ["--output", str(out.parent / "standins"), "--json", str(out)], check_sdl_standins
    ),
    "gpu_check": Case(lambda out: ["--device", "cpu", "--threads", "1", "--json", str(out)], check_gpu),
    "tsa_fidelity_study": Case(
        lambda out: ["--reference-dir", str(SHARED_DIR / "reference"), "--json", str(out)],
        check_tsa_fidelity,
        shared=("reference",),
    ),
}


def test_every_script_is_tested():
    """A new script in scripts/ must get a case here (and a --quick flag)."""
    scripts = sorted(path.stem for path in SCRIPTS_DIR.glob("[!_]*.py"))  # not helpers (_quick.py)
    assert scripts == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_script_runs_quick(name: str, tmp_path: Path):
    case = CASES[name]
    for folder in case.shared:
        shared_path(folder)
    if name == "benchmark_official_episodes":
        records = REPO_ROOT.parent / "shared" / "reference" / "meta_dataset" / "records"
        if not records.is_dir():
            unavailable(f"{records} not found (the script reads it there)")
    out = tmp_path / "out.json"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, f"scripts/{name}.py", "--quick", *case.args(out)]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert done.returncode == 0, (
        f"{' '.join(command)} exited {done.returncode}\n"
        f"--- stdout (end) ---\n{done.stdout[-3000:]}\n--- stderr (end) ---\n{done.stderr[-6000:]}"
    )
    assert out.is_file(), f"{name} wrote no {out}\n{done.stdout[-3000:]}"
    figures = json.loads(out.read_text())
    assert figures and numbers(figures), figures
    assert all(math.isfinite(x) for x in numbers(figures)), figures
    case.check(figures)
