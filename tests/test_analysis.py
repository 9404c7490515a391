"""hf_copa.analysis: the gap and its bound against the paper's formulas in float64, the official notebook's
gap, the step trace, clusters, the gap-enlarging experiment, and `hf-copa analyze` end to end."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hf_copa
from hf_copa.analysis import (
    GapTrace,
    embedding_map,
    episode_gap,
    gap_bound,
    gap_enlarging_curve,
    gap_vector,
    paired_prototypes,
    prototype_image_gap,
    silhouette,
)
from hf_copa.cli import main
from hf_copa.learners import get_learner
from hf_copa.validation import CopaValueError

from .conftest import REPO_ROOT
from .test_evaluation import small_split


def random_episode(seed: int, shots=(5, 2, 7, 1), dim: int = 12):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(shots)])
    features = torch.randn(len(labels), dim, generator=generator, dtype=torch.float64) + 0.5
    return features, labels


# --- the formulas -------------------------------------------------------------------------------------------


def test_the_gap_is_the_distance_between_the_means_of_normalised_embeddings():
    images = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: e1, e2 -> mean (0.5, 0.5)
    prototypes = torch.tensor([[5.0, 5.0]])  # normalised: (1, 1) / sqrt 2
    expected = np.sqrt(2) * (1 / np.sqrt(2) - 0.5)
    assert prototype_image_gap(images, prototypes) == pytest.approx(expected, rel=1e-12)
    assert prototype_image_gap(images, images) == 0.0
    assert prototype_image_gap(images, prototypes, normalize=False) == pytest.approx(np.hypot(4, 3.5))


@pytest.mark.parametrize("seed", range(5))
def test_gap_and_coefficient_equal_the_papers_formulas_computed_directly(seed):
    generator = np.random.default_rng(seed)
    images = generator.normal(size=(9, 16)) + 0.3
    prototypes = generator.normal(size=(4, 16))
    theta = generator.normal(size=(16, 16))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    delta = unit(images).mean(0) - unit(prototypes).mean(0)
    assert prototype_image_gap(images, prototypes) == pytest.approx(np.linalg.norm(delta), rel=1e-13)
    np.testing.assert_allclose(gap_vector(images, prototypes).numpy(), delta, rtol=1e-13)
    # max_j |cos(Δ, Θʲ)| · ‖Θ‖_F, Θʲ the j-th column (Z = X Θ), written out column by column.
    cosines = [
        abs(delta @ theta[:, j]) / (np.linalg.norm(delta) * np.linalg.norm(theta[:, j])) for j in range(16)
    ]
    coefficient = max(cosines) * np.sqrt((theta**2).sum())
    bound, got = gap_bound(torch.from_numpy(delta), torch.from_numpy(theta))
    assert got == pytest.approx(coefficient, rel=1e-13)
    assert bound == pytest.approx(coefficient * np.linalg.norm(delta), rel=1e-13)
    assert gap_bound(delta, theta) == (bound, got)  # numpy in, the same numbers


def test_the_bound_holds_on_every_random_case_and_the_signed_cosine_would_not_be_one():
    generator = np.random.default_rng(0)
    tried = 0
    for case in range(600):
        dim = int(generator.integers(2, 40))
        delta = generator.normal(size=dim) * 10.0 ** generator.uniform(-4, 1)
        kind = case % 5
        if kind == 0:
            theta = generator.normal(size=(dim, dim))
        elif kind == 1:  # low rank
            theta = generator.normal(size=(dim, 1)) @ generator.normal(size=(1, dim))
        elif kind == 2:  # near the identity, as adaptation leaves it
            theta = np.eye(dim) + 0.05 * generator.normal(size=(dim, dim))
        elif kind == 3:  # a zero column
            theta = generator.normal(size=(dim, dim))
            theta[:, generator.integers(dim)] = 0.0
        else:  # a direction aligned with the gap
            theta = np.outer(delta, generator.normal(size=dim)) + 1e-3 * generator.normal(size=(dim, dim))
        bound, coefficient = gap_bound(delta, theta)
        assert np.linalg.norm(delta @ theta) <= bound * (1 + 1e-12), case
        assert coefficient >= 0
        tried += 1
    assert tried == 600
    # Θ = −I: every cosine is ≤ 0, so max_j cos · ‖Θ‖_F · ‖Δ‖ < 0 < ‖ΔΘ‖; the absolute value makes it a bound.
    delta = np.abs(generator.normal(size=6))
    theta = -np.eye(6)
    signed = max(delta @ theta[:, j] / (np.linalg.norm(delta)) for j in range(6)) * np.sqrt(6)
    assert signed * np.linalg.norm(delta) < np.linalg.norm(delta @ theta) <= gap_bound(delta, theta)[0]


def test_the_identity_start_has_coefficient_at_least_one():
    for seed in range(20):
        delta = np.random.default_rng(seed).normal(size=32)
        coefficient = gap_bound(delta, np.eye(32))[1]
        assert coefficient == pytest.approx(np.sqrt(32) * np.abs(delta).max() / np.linalg.norm(delta))
        assert coefficient >= 1.0


def official_notebook_gap(context_data: np.ndarray, prototypes: np.ndarray) -> float:
    """HongduanTian/CoPA visualization/motivation_modality_gap/visualization.ipynb, `draw_gap_map`, its gap
    (prototypes: one row per support image, its class's prototype):
        context_data /= np.linalg.norm(context_data, axis=-1, keepdims=True) + 1e-12
        prototypes /= np.linalg.norm(prototypes, axis=-1, keepdims=True) + 1e-12
        delta = np.linalg.norm(np.mean(context_data, axis=0) - np.mean(prototypes, axis=0))
    """
    context_data = context_data / (np.linalg.norm(context_data, axis=-1, keepdims=True) + 1e-12)
    prototypes = prototypes / (np.linalg.norm(prototypes, axis=-1, keepdims=True) + 1e-12)
    return float(np.linalg.norm(np.mean(context_data, axis=0) - np.mean(prototypes, axis=0)))


def test_episode_gaps_pair_each_image_with_its_prototype_as_the_official_figures():
    features, labels = random_episode(0)
    means = torch.stack([features[labels == c].mean(0) for c in range(4)])
    official = official_notebook_gap(features.numpy(), means[labels].numpy())
    assert prototype_image_gap(features, paired_prototypes(means, labels)) == pytest.approx(
        official, rel=1e-9
    )
    # Unequal shots: every class weighing the same is another number.
    assert prototype_image_gap(features, means) != pytest.approx(official, rel=1e-3)
    # Unnormalised, the shot-weighted mean of the class means is the mean of the images: no gap at all.
    assert prototype_image_gap(features, means[labels], normalize=False) < 1e-12


@pytest.mark.parametrize("method", ["url", "copa"])
def test_episode_gap_of_a_head_is_its_maps_applied_to_the_support_set(method):
    features, labels = random_episode(1)
    head = hf_copa.adapt(features.float(), labels, method=method, steps=5)
    gap = episode_gap(head, features, labels)
    theta_image = head.image_projection.double().T  # the head applies x @ A.T: Θ = A.T
    theta_proto = head.prototype_projection.double().T
    means = torch.stack([features[labels == c].mean(0) for c in range(4)])
    expected_after = official_notebook_gap(
        (features @ theta_image).numpy(), (means @ theta_proto)[labels].numpy()
    )
    assert gap.after == pytest.approx(expected_after, rel=1e-6)
    assert (
        gap.before
        == gap.input
        == pytest.approx(official_notebook_gap(features.numpy(), means[labels].numpy()))
    )
    delta = gap_vector(features, means[labels])
    if method == "url":
        assert gap.coefficient == pytest.approx(gap_bound(delta, theta_image)[1], rel=1e-12)
        assert gap.mapped == pytest.approx(float((delta @ theta_image).norm()), rel=1e-12)
        assert gap.mapped <= gap.bound
        assert gap.coefficient_images is None
    else:
        assert gap.coefficient is None and gap.bound is None
        assert gap.coefficient_images == pytest.approx(gap_bound(delta, theta_image)[1], rel=1e-12)
        assert gap.coefficient_prototypes == pytest.approx(gap_bound(delta, theta_proto)[1], rel=1e-12)


def test_one_shot_episodes_have_no_support_gap_and_an_undefined_coefficient():
    features, labels = random_episode(2, shots=(1, 1, 1))
    gap = episode_gap(hf_copa.adapt(features.float(), labels, method="url", steps=3), features, labels)
    assert gap.before == gap.after == 0.0 and gap.coefficient is None and gap.bound == 0.0


def test_a_method_without_maps_is_a_clear_error():
    features, labels = random_episode(3)
    with pytest.raises(CopaValueError, match="ncc head learns no linear map.*url, copa"):
        episode_gap(hf_copa.adapt(features.float(), labels, method="ncc"), features, labels)
    with pytest.raises(CopaValueError, match="empty"):
        prototype_image_gap(torch.empty(0, 4), torch.ones(2, 4))
    with pytest.raises(CopaValueError, match="NaN"):
        prototype_image_gap(torch.full((2, 4), float("nan")), torch.ones(2, 4))
    with pytest.raises(CopaValueError, match="gap_bound takes delta"):
        gap_bound(torch.ones(3), torch.ones(4, 4))


# --- along adaptation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["url", "copa"])
def test_the_step_trace_starts_at_the_gap_before_and_ends_at_the_heads_gap(method):
    features, labels = random_episode(4)
    features = features.float()
    plain = get_learner(method, steps=6).fit(features, labels)
    observed = get_learner(method, steps=6)
    observed.step_observer = trace = GapTrace(features, labels)
    head = observed.fit(features, labels)
    assert len(trace.gaps) == len(trace.coefficients) == 7  # the start, then after each step
    gap = episode_gap(head, features, labels)
    assert trace.gaps[0] == pytest.approx(gap.before, rel=1e-9)
    assert trace.gaps[-1] == pytest.approx(gap.after, rel=1e-9)
    assert trace.coefficients[0] >= 1.0  # the identity start
    # Watching changes nothing: the same head with and without the observer.
    torch.testing.assert_close(head.image_projection, plain.image_projection, rtol=0, atol=0)
    assert get_learner(method).step_observer is None


# --- clusters -----------------------------------------------------------------------------------------------


def test_silhouette_is_scikit_learns_on_normalised_embeddings_and_none_where_undefined():
    from sklearn.metrics import silhouette_score

    features, labels = random_episode(5)
    unit = F.normalize(features, dim=-1).numpy()
    assert silhouette(features, labels) == pytest.approx(silhouette_score(unit, labels.numpy()), rel=1e-12)
    assert silhouette(features[:4], [0, 1, 2, 3]) is None  # one point per class
    assert silhouette(features, np.zeros(len(features))) is None  # one class
    with pytest.raises(CopaValueError, match="labels"):
        silhouette(features, [0, 1])


def test_the_pca_map_keeps_distances_of_points_in_a_plane_and_does_not_depend_on_row_order():
    generator = np.random.default_rng(0)
    basis = np.linalg.qr(generator.normal(size=(6, 2)))[0]  # a 2-D subspace of R^6
    points = generator.normal(size=(9, 2)) @ basis.T
    points /= np.linalg.norm(points, axis=1, keepdims=True)  # unit rows stay in the plane
    coords, used = embedding_map(points, "pca")
    assert used == "pca"
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.testing.assert_allclose(np.linalg.norm(coords[:, None] - coords[None], axis=-1), distances, atol=1e-9)
    order = generator.permutation(len(points))
    np.testing.assert_allclose(embedding_map(points[order], "pca")[0], coords[order], atol=1e-9)
    assert embedding_map(points[:1], "pca")[0].shape == (1, 2)
    with pytest.raises(CopaValueError, match="one of"):
        embedding_map(points, "tsne")


def test_the_umap_map_is_seeded_as_the_official_figures():
    pytest.importorskip("umap", reason="umap-learn is the umap extra")
    features, labels = random_episode(6, shots=(6, 6, 6))
    first, used = embedding_map(features, "umap")
    assert used == "umap" and first.shape == (18, 2) and np.isfinite(first).all()
    np.testing.assert_array_equal(embedding_map(features, "umap")[0], first)
    assert embedding_map(features[:3], "auto")[1] == "pca"  # too few points for UMAP
    with pytest.raises(CopaValueError, match="at least 5"):
        embedding_map(features[:3], "umap")


# --- the gap-enlarging experiment ---------------------------------------------------------------------------


def test_the_unmoved_point_of_the_enlarging_curve_is_the_heads_own_query_loss():
    features, labels = random_episode(7)
    queries, truth = random_episode(8)
    head = hf_copa.adapt(features.float(), labels, method="copa", steps=5)
    images, prototypes = head.view(features.float())
    query_view = head.view(queries.float())[0]
    curve = gap_enlarging_curve(
        images, labels, prototypes, query_view, truth, head.scale, scales=(-1.0, 0.0, 1.0)
    )
    expected = F.cross_entropy(head.logits(queries.float()).double(), truth)
    assert curve.losses[1] == pytest.approx(float(expected), rel=1e-5)
    assert curve.gaps[1] == pytest.approx(curve.original_gap, rel=1e-9)
    accuracy = float((head.logits(queries.float()).argmax(1) == truth).double().mean())
    assert curve.accuracies[1] == accuracy
    assert curve.gaps[0] < curve.gaps[1] < curve.gaps[2]  # narrowed, as adapted, enlarged
    assert curve.best_scale in curve.scales


# --- over episodes: hf-copa analyze -------------------------------------------------------------------------

FIGURES = {
    "gap_before_after.png",
    "coefficient_histogram.png",
    "gap_vs_accuracy.png",
    "time_per_episode.png",
    "gap_enlarging.png",
    "gap_along_adaptation.png",
}


def readme_analyze_command() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("hf-copa analyze ")]
    assert lines, "the README shows an hf-copa analyze command"
    return shlex.split(lines[0].split("#")[0])[1:]


def with_option(argv: list[str], option: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(option) + 1] = value
    return argv


def test_the_readmes_analyze_command_writes_the_json_and_every_figure(datasets_dir, tmp_path, capsys):
    """The README's command as written (fewer episodes), on the bundled model and the shared datasets."""
    argv = readme_analyze_command()
    assert argv[argv.index("--method") + 1 : argv.index("--method") + 3] == ["url", "copa"]
    argv = with_option(with_option(argv, "--episodes", "3"), "--output", str(tmp_path / "analysis"))
    argv = [a.replace("../shared/datasets/", f"{datasets_dir}/") for a in argv]
    assert main([*argv, "--no-progress", "--cache-dir", "none"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "analysis"
    analysis = json.loads((folder / "analysis.json").read_text())
    domains = list(analysis["config"]["domains"])
    assert FIGURES | {f"clusters_{d}.png" for d in domains} == {p.name for p in folder.glob("*.png")}
    for png in folder.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for domain in domains:
        for method in ("url", "copa"):
            stats = analysis["summary"][domain][method]
            assert stats["accuracy"]["n"] == 3 and stats["gap_after"]["n"] == 3
            assert stats["seconds"]["mean"] > 0
        assert analysis["summary"][domain]["url"]["coefficient"]["n"] == 3
        assert analysis["summary"][domain]["copa"]["coefficient_images"]["n"] == 3
        assert len(analysis["gap_along_adaptation"][domain]["url"]["gap"]) == 41  # URL: 40 steps
    assert "| domain | method | accuracy" in out and "analysis.json" in out


@pytest.fixture(scope="module")
def small_domain(tmp_path_factory, datasets_dir):
    root = tmp_path_factory.mktemp("analysis")
    data_dir = root / "quickdraw_small" / "data"
    data_dir.mkdir(parents=True)
    small_split(datasets_dir / "quickdraw", num_classes=6, per_class=15).to_parquet(
        str(data_dir / "test-00000-of-00001.parquet")
    )
    return root / "quickdraw_small"


def analyze_args(dataset, output, *extra):
    return [
        "analyze",
        "--dataset",
        str(dataset),
        "--method",
        "url",
        "copa",
        "ncc",
        "--episodes",
        "4",
        "--cluster-map",
        "pca",
        "--no-progress",
        "--cache-dir",
        "none",
        "--output",
        str(output),
        *extra,
    ]


def test_analyze_agrees_with_evaluate_on_accuracy_and_scores_methods_without_maps(small_domain, tmp_path):
    assert main(analyze_args(small_domain, tmp_path / "a")) == 0
    analysis = json.loads((tmp_path / "a" / "analysis.json").read_text())
    evaluated = tmp_path / "e.json"
    argv = ["evaluate", "--dataset", str(small_domain), "--method", "url", "copa", "ncc", "--episodes", "4"]
    assert (
        main([*argv, "--per-episode", "--no-progress", "--cache-dir", "none", "--output", str(evaluated)])
        == 0
    )
    accuracies = json.loads(evaluated.read_text())["episode_accuracies"]["quickdraw_small"]
    for method in ("url", "copa", "ncc"):
        records = analysis["episodes"]["quickdraw_small"][method]
        assert [r["episode"] for r in records] == [0, 1, 2, 3]
        np.testing.assert_allclose([r["accuracy"] for r in records], 100 * np.array(accuracies[method]))
    ncc = analysis["episodes"]["quickdraw_small"]["ncc"][0]
    assert ncc["gap_after"] is None and ncc["coefficient"] is None and ncc["seconds"] > 0  # documented: null
    assert analysis["definitions"]["gap_after"] and analysis["config"]["cluster_map"] == "pca"


def test_analyze_with_one_and_two_processes_writes_the_same_analysis(small_domain, tmp_path):
    assert main(analyze_args(small_domain, tmp_path / "one", "--no-trace")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "hf_copa.cli"]
    completed = subprocess.run(
        launch + analyze_args(small_domain, tmp_path / "two", "--no-trace"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    def comparable(path):
        data = json.loads((path / "analysis.json").read_text())
        for per_method in data["episodes"].values():
            for records in per_method.values():
                for record in records:
                    record.pop("seconds")
        for per_method in data["summary"].values():
            for stats in per_method.values():
                stats.pop("seconds")
        return data

    one, two = comparable(tmp_path / "one"), comparable(tmp_path / "two")
    assert (one["config"].pop("processes"), two["config"].pop("processes")) == (1, 2)
    assert (one["config"].pop("threads"), two["config"].pop("threads")) == (torch.get_num_threads(), 1)
    # The same episodes, records and figures' data; the heads' float32 sums differ by thread count (~1e-7).
    assert_nearly_equal(one, two)


def assert_nearly_equal(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_nearly_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_nearly_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), path
    else:
        assert a == b, path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--method", "ncc", "finetune"],
            "learn no linear map.*add one of url|learn no linear map.*add one of",
        ),
        (["--cluster-episode", "9"], "cluster_episode 9 is not among the 4 episodes"),
    ],
)
def test_bad_analyses_are_one_line_errors_and_write_nothing(small_domain, tmp_path, capsys, extra, message):
    argv = analyze_args(small_domain, tmp_path / "out")
    if extra[0] == "--method":
        start = argv.index("--method")
        argv[start : start + 4] = extra
    else:
        argv += extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1 and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*"))


def test_an_output_that_is_a_file_or_a_one_class_dataset_is_a_clear_error(small_domain, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(analyze_args(small_domain, tmp_path / "file")) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"
    one_class = tmp_path / "one_class" / "data"
    one_class.mkdir(parents=True)
    import datasets

    split = datasets.load_dataset(str(small_domain), split="test")
    split.filter(lambda row: row["label"] == split[0]["label"]).to_parquet(str(one_class / "test.parquet"))
    capsys.readouterr()  # the filter's progress bar
    assert main(analyze_args(tmp_path / "one_class", tmp_path / "out")) == 2
    err = capsys.readouterr().err.split("\n")[-2]  # the last line, after datasets' own progress bar
    assert err.startswith("hf-copa: error: cannot sample episodes") and "1 classes in total" in err
    assert not (tmp_path / "out" / "analysis.json").exists()


def test_the_analysis_extra_is_named_when_it_is_missing(monkeypatch, small_domain, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # what an import of an absent package does
    assert main(analyze_args(small_domain, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "scikit-learn, which is not installed: pip install 'hf-copa[analysis]'" in err


def test_importing_hf_copa_loads_no_analysis_dependency():
    code = "import sys, hf_copa; print(any(m in sys.modules for m in ('sklearn', 'matplotlib', 'umap')))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "False"


def test_one_shot_episodes_give_documented_empty_coefficients_and_every_figure_still(small_domain, tmp_path):
    """1-shot support sets have gap 0 (each prototype is its image): null coefficients, figures say so."""
    assert main(analyze_args(small_domain, tmp_path / "out", "--protocol", "5-way-1-shot")) == 0
    analysis = json.loads((tmp_path / "out" / "analysis.json").read_text())
    stats = analysis["summary"]["quickdraw_small"]
    assert stats["url"]["gap_before"]["mean"] == 0.0 and stats["url"]["coefficient"]["n"] == 0
    assert stats["copa"]["coefficient_images"]["mean"] is None
    assert stats["url"]["silhouette_after"]["n"] == 4  # the queries: several per class
    assert (tmp_path / "out" / "coefficient_histogram.png").stat().st_size > 0
