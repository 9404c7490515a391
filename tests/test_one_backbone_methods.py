"""Finetune, fo-Proto-MAML, Simple CNAPS' Mahalanobis classifier and CoPA's transformer head against
float64 transcriptions of their official loops (`tests.support.official`, each citing its file and lines).

The official code released no outputs for these methods on the shared reference episodes, so each learner
is held to its transcription: in float64 to round-off (the algorithm), in float32 to a bound set by float32
round-off (what users run). Random initialisations (Finetune's classifier, the transformer's position
embeddings) are drawn by hf_copa from its seed; the transcription is given the same draw and everything
after it is tested exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hf_copa
from hf_copa import CopaModel, get_learner
from hf_copa.conversion import convert_url_checkpoint
from hf_copa.learners.finetune import TRUNCATED_INIT_STD, WEIGHT_NORM_INIT_STD, initial_weights
from hf_copa.learners.mahalanobis import official_covariance
from hf_copa.prototype_transformer import random_position_embeddings
from tests.support.official import (
    official_copa_transformer,
    official_estimate_cov,
    official_finetune,
    official_mahalanobis,
    official_proto_maml,
)

from .conftest import tiny_backbone

pytestmark = pytest.mark.usefixtures("single_thread")

EPISODES = range(6)
FINETUNE_OFFICIAL = {  # preset -> official_finetune's switches (the gin file each preset follows)
    "default": {"adam": True, "weight_norm": True, "cosine": False, "multiplier": 1.0},
    "mini-imagenet": {"adam": False, "weight_norm": False, "cosine": False, "multiplier": 1.0},
    "cosine-mini-imagenet": {"adam": False, "weight_norm": False, "cosine": True, "multiplier": 10.0},
    "base-config": {"adam": False, "weight_norm": False, "cosine": False, "multiplier": 1.0},
}
# Plain gradient descent at lr 0.01 on the *summed* support loss overshoots on the two largest episodes
# (259 and 500 support images): the loss climbs from 6.6 / 7.2 to ~200 / ~400 before it falls to 0, and
# that climb amplifies round-off, so even two float64 runs part (1e-4 after 30 steps, 1e-2 and 0.6 of the
# largest logit after 200). The first 10 steps agree to 1e-12 there; those are what is tested.
FINETUNE_CHAOTIC_STEPS = {("mini-imagenet", 4): 10, ("mini-imagenet", 5): 10}


def relative_error(mine: torch.Tensor, official: torch.Tensor) -> float:
    return float((mine - official).abs().max() / official.abs().max())


@pytest.fixture(scope="module")
def copa_reference(reference_dir):
    return np.load(reference_dir / "copa_adaptation.npz")


def reference_episode(reference, i: int, dtype=torch.float64):
    support, labels, query = (
        torch.from_numpy(reference[f"ep{i}_{k}"]) for k in ("support", "support_labels", "query")
    )
    return support.to(dtype), labels, query.to(dtype)


def random_task(shots: list[int], dim: int = 24, queries: int = 7, seed: int = 0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(shots)])
    labels = labels[torch.randperm(len(labels), generator=generator)]
    centres = torch.randn(len(shots), dim, generator=generator, dtype=dtype)
    support = (centres[labels] + 0.5 * torch.randn(len(labels), dim, generator=generator, dtype=dtype)).relu()
    query = torch.rand(queries, dim, generator=generator, dtype=dtype) * 2
    return support, labels, query


def finetune_initial_weights(learner, num_classes: int, dim: int, dtype) -> torch.Tensor:
    """The draw hf_copa makes, as the official [d, way] variable (already times its init std)."""
    hp = learner.hyperparameters
    std = WEIGHT_NORM_INIT_STD if hp["weight_norm"] else TRUNCATED_INIT_STD
    return torch.as_tensor(
        std * initial_weights(num_classes, dim, hp["seed"], not hp["weight_norm"]), dtype=dtype
    ).T


def official_finetune_logits(learner, support, labels, query, backbone=None):
    hp = learner.hyperparameters
    dim = support.shape[-1] if backbone is None else backbone.config.feature_dim
    w_init = finetune_initial_weights(learner, int(labels.max()) + 1, dim, support.dtype)
    preset = next(p for p, switches in FINETUNE_OFFICIAL.items() if _matches(hp, switches))
    return official_finetune(
        support, labels, query, w_init, hp["steps"], hp["lr"], backbone=backbone, **FINETUNE_OFFICIAL[preset]
    )


def _matches(hp, switches) -> bool:
    return (
        (hp["optimizer"] == "adam") == switches["adam"]
        and hp["weight_norm"] == switches["weight_norm"]
        and (hp["classifier"] == "cosine") == switches["cosine"]
    )


# --- finetune ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["default", "mini-imagenet", "cosine-mini-imagenet"])
@pytest.mark.parametrize("i", EPISODES)
def test_finetune_equals_the_official_loop_on_the_reference_episodes_in_float64(copa_reference, i, preset):
    support, labels, query = reference_episode(copa_reference, i)
    overrides = (
        {"steps": FINETUNE_CHAOTIC_STEPS[(preset, i)]} if (preset, i) in FINETUNE_CHAOTIC_STEPS else {}
    )
    learner = get_learner("finetune", preset=preset, **overrides)
    mine = learner.fit(support, labels).logits(query)
    assert relative_error(mine, official_finetune_logits(learner, support, labels, query)) < 1e-9


@pytest.mark.parametrize("i", [0, 3, 5])
def test_finetune_in_float32_stays_within_round_off_of_the_float64_official_loop(copa_reference, i):
    support, labels, query = reference_episode(copa_reference, i)
    learner = get_learner("finetune")
    mine = learner.fit(support.float(), labels).logits(query.float())
    assert relative_error(mine.double(), official_finetune_logits(learner, support, labels, query)) < 1e-5


@pytest.mark.parametrize("preset", list(FINETUNE_OFFICIAL))
@pytest.mark.parametrize("shots", [[1, 1, 1], [5, 1, 3, 2], [2] * 7])
def test_finetune_equals_the_official_loop_on_random_features(preset, shots):
    support, labels, query = random_task(shots, seed=len(shots))
    learner = get_learner("finetune", preset=preset, steps=25)
    head = learner.fit(support, labels)
    assert (
        relative_error(head.logits(query), official_finetune_logits(learner, support, labels, query)) < 1e-10
    )
    assert len(head.train_losses) == 25 and np.isfinite(head.train_losses).all()


def test_finetune_init_depends_on_the_seed_and_class_only():
    first = initial_weights(3, 8, seed=0, truncated=True)
    assert np.array_equal(first, initial_weights(5, 8, seed=0, truncated=True)[:3])
    assert not np.array_equal(first, initial_weights(3, 8, seed=1, truncated=True))
    assert np.abs(first).max() <= 2  # truncated normal: nothing beyond two standard deviations


# --- proto-maml ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["all", "imagenet"])
@pytest.mark.parametrize("i", EPISODES)
def test_proto_maml_equals_the_official_loop_on_the_reference_episodes(copa_reference, i, preset):
    support, labels, query = reference_episode(copa_reference, i)
    learner = get_learner("proto-maml", preset=preset)
    hp = learner.hyperparameters
    official = official_proto_maml(support, labels, query, hp["lr"], hp["steps"])
    assert relative_error(learner.fit(support, labels).logits(query), official) < 1e-12
    mine32 = learner.fit(support.float(), labels).logits(query.float())
    assert relative_error(mine32.double(), official) < 1e-5


@pytest.mark.parametrize("shots", [[1, 1], [4, 1, 2], [3] * 6])
def test_proto_maml_equals_the_official_loop_on_random_features(shots):
    support, labels, query = random_task(shots, seed=7)
    official = official_proto_maml(support, labels, query, alpha=0.3, steps=9)
    head = get_learner("proto-maml", steps=9, lr=0.3).fit(support, labels)
    assert relative_error(head.logits(query), official) < 1e-12


def test_proto_maml_with_zero_steps_is_protonet_with_squared_euclidean_distance():
    support, labels, query = random_task([3, 1, 2, 4], seed=3)
    logits = get_learner("proto-maml", steps=0).fit(support, labels).logits(query)
    prototypes = torch.stack([support[labels == k].mean(0) for k in range(4)])
    protonet = -torch.cdist(query, prototypes).square()
    # 2 q.mu - |mu|^2 = -|q - mu|^2 + |q|^2: the same logits up to a per-query constant, so the same softmax
    torch.testing.assert_close(logits - protonet, query.square().sum(1, keepdim=True).expand(-1, 4))
    torch.testing.assert_close(logits.softmax(1), protonet.softmax(1))


# --- mahalanobis ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", EPISODES)
def test_mahalanobis_equals_the_official_classifier_on_the_reference_episodes(copa_reference, i):
    support, labels, query = reference_episode(copa_reference, i)
    official = official_mahalanobis(support, labels, query)
    assert relative_error(get_learner("mahalanobis").fit(support, labels).logits(query), official) < 1e-12
    mine32 = get_learner("mahalanobis").fit(support.float(), labels).logits(query.float())
    assert relative_error(mine32.double(), official) < 1e-5


@pytest.mark.parametrize("shots", [[1, 1, 1], [1, 4, 2], [6, 6]])
def test_mahalanobis_equals_the_official_classifier_on_random_features(shots):
    support, labels, query = random_task(shots, seed=11)
    official = official_mahalanobis(support, labels, query)
    assert relative_error(get_learner("mahalanobis").fit(support, labels).logits(query), official) < 1e-12


def test_the_covariance_of_one_example_is_the_official_scalar_not_the_textbook_formula():
    example = torch.tensor([[1.0, 2.0, 6.0]], dtype=torch.float64)
    official = official_estimate_cov(example)
    assert official.dim() == 0  # a scalar, broadcast over the d x d matrix by the official sum
    assert float(official) == pytest.approx(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    assert torch.equal(official_covariance(example), official)
    several = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(official_covariance(several), official_estimate_cov(several))
    torch.testing.assert_close(official_covariance(several), torch.cov(several.T))  # unbiased, n >= 2


def test_beta_is_the_ridge_of_the_official_classifier():
    support, labels, query = random_task([2, 3], seed=5)
    plain = get_learner("mahalanobis", beta=1.0).fit(support, labels).logits(query)
    ridged = get_learner("mahalanobis", beta=4.0).fit(support, labels).logits(query)
    torch.testing.assert_close(plain, official_mahalanobis(support, labels, query))
    assert not torch.allclose(plain, ridged)


# --- the all-layers variants, on a tiny float64 backbone ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny64() -> CopaModel:
    return tiny_backbone(seed=3).double()


def tiny_images(count: int, seed: int) -> torch.Tensor:
    return (
        torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
        - 1
    )


@pytest.mark.parametrize("preset", ["default", "mini-imagenet"])
def test_finetune_all_layers_equals_the_official_loop_and_leaves_the_backbone_untouched(tiny64, preset):
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    support, query = tiny_images(7, seed=1), tiny_images(4, seed=2)
    before = {name: tensor.clone() for name, tensor in tiny64.state_dict().items()}
    learner = get_learner("finetune-all", preset=preset, steps=6, lr=0.003)
    head = learner.fit_images(tiny64, support, labels)
    assert all(torch.equal(before[name], tensor) for name, tensor in tiny64.state_dict().items())
    assert all(parameter.grad is None for parameter in tiny64.parameters())
    assert set(head.backbone_weights) == {name for name, _ in tiny64.named_parameters()}
    mine = tiny64(
        query, weights=head.backbone_weights
    ).pooler_output  # float64 (extract_features gives float32)
    official = official_finetune_logits(learner, support, labels, query, backbone=tiny64)
    assert relative_error(head.logits(mine), official) < 1e-10


def test_proto_maml_all_layers_equals_the_official_inner_loop_but_batch_norm(tiny64):
    labels = torch.tensor([1, 0, 1, 0, 2])
    support, query = tiny_images(5, seed=3), tiny_images(3, seed=4)
    learner = get_learner("proto-maml-all", steps=4, lr=0.05)
    head = learner.fit_images(tiny64, support, labels)
    assert not any("bn" in name for name in head.backbone_weights)  # adapt_batch_norm=False
    mine = head.logits(tiny64(query, weights=head.backbone_weights).pooler_output)
    official = official_proto_maml(support, labels, query, alpha=0.05, steps=4, backbone=tiny64)
    assert relative_error(mine, official) < 1e-10


# --- copa-transformer ----------------------------------------------------------------------------------


def official_transformer_run(learner, support_maps, labels, query_maps):
    hp = learner.hyperparameters
    dim, height, width = support_maps.shape[1:]
    rng = np.random.default_rng(hp["seed"])  # the prototype encoder's draw first, as hf_copa's
    positions = [random_position_embeddings(rng, height * width, dim, support_maps) for _ in range(2)]
    return official_copa_transformer(
        support_maps,
        labels,
        query_maps,
        *positions,
        lr=hp["lr"],
        weight_decay=hp["weight_decay"],
        tau=hp["tau"],
        steps=hp["steps"],
        num_heads=hp["heads"],
        num_blocks=hp["blocks"],
    )


@pytest.mark.parametrize(("blocks", "heads"), [(1, 4), (2, 2)])
def test_copa_transformer_equals_the_official_loop_on_random_maps(blocks, heads):
    generator = torch.Generator().manual_seed(blocks)
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    support = torch.rand(7, 16, 3, 3, generator=generator, dtype=torch.float64)
    query = torch.rand(5, 16, 3, 3, generator=generator, dtype=torch.float64)
    learner = get_learner("copa-transformer", steps=12, lr=3e-3, blocks=blocks, heads=heads)
    head = learner.fit(support, labels)
    losses, official = official_transformer_run(learner, support, labels, query)
    np.testing.assert_allclose(head.train_losses, losses, rtol=1e-12)
    assert relative_error(head.logits(query), official) < 1e-12


@pytest.fixture(scope="module")
def reference_maps(reference_dir, tmp_path_factory):
    """The feature maps [N, 512, 6, 6] of the reference checkpoint for the first two TSA reference episodes
    (real images, 10 and 9 support)."""
    folder = convert_url_checkpoint(
        reference_dir / "url_checkpoint.pth.tar.xz", tmp_path_factory.mktemp("converted") / "copa-url"
    )
    model = CopaModel.from_pretrained(folder).eval()
    reference = np.load(reference_dir / "tsa_adaptation.npz")
    episodes = []
    for i in (0, 1):
        support = model.extract_features(list(reference[f"ep{i}_support_uint8"]), spatial=True)
        query = model.extract_features(list(reference[f"ep{i}_query_uint8"]), spatial=True)
        episodes.append((support, torch.from_numpy(reference[f"ep{i}_support_labels"]), query))
    return episodes


@pytest.mark.parametrize(("i", "preset"), [(0, "default"), (1, "high-lr")])
def test_copa_transformer_equals_the_official_loop_on_real_feature_maps(reference_maps, i, preset):
    support, labels, query = (t.double() if t.is_floating_point() else t for t in reference_maps[i])
    assert support.shape[1:] == (512, 6, 6)
    learner = get_learner("copa-transformer", preset=preset)
    head = learner.fit(support, labels)
    losses, official = official_transformer_run(learner, support, labels, query)
    np.testing.assert_allclose(head.train_losses, losses, rtol=1e-10)
    assert relative_error(head.logits(query), official) < 1e-10
    if i == 0:  # float32, as users run it: within round-off of the float64 official loop
        head32 = learner.fit(support.float(), labels)
        np.testing.assert_allclose(head32.train_losses, losses, rtol=1e-4)
        assert float((head32.logits(query.float()).double() - official).abs().max()) < 1e-3


def test_copa_transformer_needs_feature_maps_and_says_how_to_get_them():
    with pytest.raises(ValueError, match="feature maps"):
        get_learner("copa-transformer").fit(torch.rand(4, 16), torch.tensor([0, 1, 0, 1]))


def test_copa_transformer_refuses_heads_that_do_not_divide_the_dimension():
    with pytest.raises(ValueError, match="heads=3 must divide the feature dimension 16"):
        get_learner("copa-transformer", heads=3, steps=1).fit(
            torch.rand(4, 16, 2, 2), torch.tensor([0, 1, 0, 1])
        )


def test_copa_transformer_head_scores_queries_by_feature_maps():
    support, labels = torch.rand(6, 8, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    head = get_learner("copa-transformer", steps=2, heads=2).fit(support, labels)
    assert head.feature_kind == "maps"
    assert head.logits(torch.rand(3, 8, 2, 2)).shape == (3, 3)
    with pytest.raises(ValueError, match=r"maps of shape \(8, 2, 2\)"):
        head.logits(torch.rand(3, 8, 3, 3))


def test_every_registered_method_is_held_to_an_official_transcription_somewhere():
    covered = {"finetune", "finetune-all", "proto-maml", "proto-maml-all", "mahalanobis", "copa-transformer"}
    held_elsewhere = {"ncc", "url", "copa", "tsa", "copa+tsa"}  # test_fidelity.py, test_fidelity_tsa.py
    held_elsewhere |= {"sur", "urt"}  # test_fidelity_several_backbones.py
    assert set(hf_copa.available_methods()) == covered | held_elsewhere


def test_a_diverging_inner_loop_is_a_clear_error_not_a_nan_classifier(tiny64):
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(
        ValueError, match=r"proto-maml-all diverged: .* step \d+ of 6; the learning rate \(lr=100\)"
    ):
        get_learner("proto-maml-all", lr=100.0).fit_images(tiny64, tiny_images(6, seed=5), labels)
    with pytest.raises(ValueError, match="finetune diverged"):
        get_learner("finetune", preset="mini-imagenet", lr=1e37, steps=3).fit(torch.rand(6, 16) * 10, labels)


@pytest.mark.parametrize("setting", ["all-sources", "imagenet-only"])
@pytest.mark.parametrize("protocol", ["meta-dataset", "5-way-1-shot"])
def test_the_papers_settings_name_presets_each_method_has(protocol, setting):
    from hf_copa.meta_dataset import benchmark

    for source in benchmark.SOURCES:
        settings = benchmark.paper_settings(source, protocol, setting)
        for method, overrides in settings.items():
            assert get_learner(method, **overrides).hyperparameters  # the named preset exists
        new_methods = {"finetune", "finetune-all", "proto-maml", "proto-maml-all", "copa-transformer"}
        assert new_methods <= set(settings)
        assert get_learner("proto-maml", **settings["proto-maml"]).hyperparameters["steps"] == 6
        assert get_learner("finetune-all", **settings["finetune-all"]).hyperparameters["lr"] == 0.01
        transformer = get_learner("copa-transformer", **settings["copa-transformer"]).hyperparameters
        high = source in ("mnist", "traffic_sign")  # models/adaptation.py l. 76-82, every protocol
        assert (transformer["lr"], transformer["weight_decay"]) == ((1e-3, 0.0) if high else (1e-4, 0.1))
