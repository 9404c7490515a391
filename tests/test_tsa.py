"""TSA and CoPA+TSA: residual adapters in a frozen backbone, the learners' contract, and every entry point.

Fidelity to the official code is in test_fidelity_tsa.py; these run on a tiny backbone.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hf_copa
from hf_copa import ADAPTATION_DEFAULTS, ADAPTATION_PRESETS, CopaModel, get_learner
from hf_copa.adapters import (
    ADAPTER_INIT_SCALE,
    adapter_shapes,
    check_adapters,
    first_adapted_stage,
    identity_adapters,
)
from hf_copa.frozen import frozen_backbone

from .conftest import tiny_backbone

pytestmark = pytest.mark.usefixtures("single_thread")

BACKBONE_METHODS = ["tsa", "copa+tsa"]
STAGES = {"tsa": ["layer1", "layer2", "layer3", "layer4"], "copa+tsa": ["layer2", "layer3"]}
FAST = {"steps": 4}


def clustered_images(ways: int = 3, shots: int = 3, seed: int = 0, side: int = 32):
    """Pixel values [ways*shots, 3, side, side] in [-1, 1]: one random pattern per class plus noise."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.rand(ways, 3, side, side, generator=generator) * 2 - 1
    labels = torch.arange(ways).repeat(shots)
    noise = 0.15 * torch.randn(len(labels), 3, side, side, generator=generator)
    return (patterns[labels] + noise).clamp(-1, 1), labels


@pytest.fixture(scope="module")
def backbone() -> CopaModel:
    return tiny_backbone()


@pytest.fixture(scope="module")
def episode():
    support, labels = clustered_images(seed=1)
    query, query_labels = clustered_images(shots=2, seed=1)  # same patterns, fresh noise
    return support, labels, query, query_labels


# --- the adapters --------------------------------------------------------------------------------------


def test_adapters_name_every_3x3_block_convolution_of_the_chosen_stages(backbone):
    shapes = adapter_shapes(backbone)
    assert len(shapes) == 4 * 2 * 2  # 4 stages x 2 blocks x 2 convolutions
    assert shapes["layer1.0.conv1"] == (8, 8, 1, 1)
    assert shapes["layer3.0.conv1"] == (16, 8, 1, 1)  # the stride-2 convolution changes the width
    assert not any("downsample" in name for name in shapes)
    assert set(adapter_shapes(backbone, [2, 3])) == {
        f"layer{s}.{b}.conv{c}" for s in (2, 3) for b in (0, 1) for c in (1, 2)
    }
    with pytest.raises(ValueError, match="stages 1..4"):
        adapter_shapes(backbone, [5])


def test_identity_adapters_start_at_1e_4_times_identity(backbone):
    adapters = identity_adapters(backbone, [3])
    alpha = adapters["layer3.0.conv1"]
    assert alpha.requires_grad and alpha.shape == (16, 8, 1, 1)
    torch.testing.assert_close(alpha[:, :, 0, 0], ADAPTER_INIT_SCALE * torch.eye(16, 8), rtol=0, atol=0)
    assert first_adapted_stage(backbone, adapters) == 2
    assert first_adapted_stage(backbone, {}) == 4


def test_a_residual_adapter_is_an_extra_centre_tap_of_its_convolution(backbone, episode):
    """conv(x) + conv2d(x, alpha, stride) equals the convolution with alpha added to its 3x3 kernel's centre
    (padding 1): an independent way to build the adapted network, by editing a copy's weights."""
    support = episode[0]
    generator = torch.Generator().manual_seed(3)
    adapters = {
        name: 0.05 * torch.randn(shape, generator=generator)
        for name, shape in adapter_shapes(backbone).items()
    }
    edited = copy.deepcopy(backbone)
    with torch.no_grad():
        for name, alpha in adapters.items():
            edited.get_submodule(name).weight[:, :, 1, 1] += alpha[:, :, 0, 0]
    expected = edited.extract_features(support)
    torch.testing.assert_close(backbone.extract_features(support, adapters=adapters), expected)
    assert not torch.allclose(backbone.extract_features(support), expected, atol=1e-3)


def test_zero_adapters_leave_the_backbone_unchanged(backbone, episode):
    zeros = {name: torch.zeros(shape) for name, shape in adapter_shapes(backbone).items()}
    plain = backbone(episode[0])
    adapted = backbone(episode[0], adapters=zeros)
    torch.testing.assert_close(adapted.pooler_output, plain.pooler_output, rtol=0, atol=0)


def test_adapters_for_another_backbone_are_refused(backbone):
    with pytest.raises(ValueError, match="layer9.0.conv1"):
        check_adapters(backbone, {"layer9.0.conv1": torch.zeros(8, 8, 1, 1)})
    with pytest.raises(ValueError, match="shape"):
        backbone(torch.zeros(1, 3, 32, 32), adapters={"layer1.0.conv1": torch.zeros(4, 8, 1, 1)})


def test_frozen_backbone_leaves_an_eval_model_untouched_and_restores_a_training_one():
    model = tiny_backbone()
    flags = [p.requires_grad for p in model.parameters()]
    with frozen_backbone(model):
        assert not model.training  # nothing to switch
    assert [p.requires_grad for p in model.parameters()] == flags  # never touched
    model.train()
    model.layer1[0].conv1.weight.requires_grad_(False)  # a caller's own choice survives
    with frozen_backbone(model):
        assert not model.training
        assert model.layer2[0].conv1.weight.requires_grad  # gradients are not switched off here
    assert model.training
    assert not model.layer1[0].conv1.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "layer1.0.conv1.weight")


@pytest.mark.parametrize("method", BACKBONE_METHODS)
def test_adapting_never_changes_what_another_task_sharing_the_backbone_sees(method, episode):
    """While one task adapts, the shared eval-mode backbone keeps its mode and flags, and gets no gradients:
    a second task reading it at any moment (here: from a forward hook, at every step) sees it unchanged."""
    model = tiny_backbone()
    seen = []
    hook = model.layer3[0].register_forward_hook(
        lambda module, args, output: seen.append(
            (model.training, all(p.requires_grad for p in model.parameters()), model.conv1.weight.grad)
        )
    )
    support, labels, _, _ = episode
    try:
        get_learner(method, **FAST).fit_images(model, support, labels)
    finally:
        hook.remove()
    assert len(seen) > FAST["steps"] and all(state == (False, True, None) for state in seen)
    assert all(p.grad is None for p in model.parameters())


# --- the learners' contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", BACKBONE_METHODS)
def test_fit_images_returns_a_head_with_the_adapters_and_leaves_the_backbone_untouched(method, episode):
    model = tiny_backbone().train()  # BatchNorm must still run in eval mode during adaptation
    before = {k: v.clone() for k, v in model.state_dict().items()}
    support, labels, query, _ = episode
    head = get_learner(method, **FAST).fit_images(model, support, labels)

    assert head.method == method and head.num_classes == 3 and head.feature_dim == 16
    assert sorted({name.split(".")[0] for name in head.adapters}) == STAGES[method]
    assert len(head.train_losses) == FAST["steps"]
    assert not any(alpha.requires_grad for alpha in head.adapters.values())
    assert model.training  # restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # running statistics included
    # The result equals adapting the same backbone in eval mode: BatchNorm used its running statistics.
    again = get_learner(method, **FAST).fit_images(tiny_backbone().eval(), support, labels)
    assert head.train_losses == again.train_losses


@pytest.mark.parametrize("method", BACKBONE_METHODS)
def test_fit_images_is_deterministic_and_learns_the_task(method, backbone, episode):
    support, labels, query, query_labels = episode
    first = get_learner(method, steps=10).fit_images(backbone, support, labels)
    second = get_learner(method, steps=10).fit_images(backbone, support, labels)
    assert first.train_losses == second.train_losses
    for name, alpha in first.adapters.items():
        assert torch.equal(alpha, second.adapters[name])
    assert first.train_losses[-1] < first.train_losses[0]
    logits = first.logits(backbone.extract_features(query, adapters=first.adapters))
    assert torch.equal(logits.argmax(1), query_labels)


@pytest.mark.parametrize("method", BACKBONE_METHODS)
def test_adapters_and_heads_move_away_from_their_initialisation(method, backbone, episode):
    support, labels, _, _ = episode
    head = get_learner(method, **FAST).fit_images(backbone, support, labels)
    init = identity_adapters(backbone, [int(s[-1]) for s in STAGES[method]])
    assert all(not torch.allclose(head.adapters[n], init[n], atol=1e-6) for n in init)
    assert not torch.allclose(head.image_projection, torch.eye(16), atol=1e-6)
    if method == "tsa":  # one map beta for images and prototypes, as URL's head
        assert torch.equal(head.image_projection, head.prototype_projection)
    else:
        assert not torch.equal(head.image_projection, head.prototype_projection)


@pytest.mark.parametrize("method", BACKBONE_METHODS)
def test_prototypes_are_class_means_of_the_adapted_support_features(method, backbone, episode):
    support, labels, _, _ = episode
    head = get_learner(method, **FAST).fit_images(backbone, support, labels)
    features = backbone.extract_features(support, adapters=head.adapters)
    means = torch.stack([features[labels == c].mean(0) for c in range(3)])
    torch.testing.assert_close(head.prototypes, means, rtol=1e-5, atol=1e-6)


def test_zero_steps_give_ncc_on_the_initial_adapters(backbone, episode):
    support, labels, query, _ = episode
    for method in BACKBONE_METHODS:
        head = get_learner(method, steps=0).fit_images(backbone, support, labels)
        assert head.train_losses == []
        torch.testing.assert_close(head.image_projection, torch.eye(16), rtol=0, atol=0)
        adapted = backbone.extract_features(support, adapters=head.adapters)
        ncc = hf_copa.adapt(adapted, labels, method="ncc")
        query_features = backbone.extract_features(query, adapters=head.adapters)
        torch.testing.assert_close(head.logits(query_features), ncc.logits(query_features))


def test_tsa_learning_rates_go_to_their_own_parameters(backbone, episode):
    """lr drives the adapters (alpha), lr_beta the head (beta): a vanishing rate freezes only its part."""
    support, labels, _, _ = episode
    init = identity_adapters(backbone)
    frozen_alpha = get_learner("tsa", lr=1e-12, **FAST).fit_images(backbone, support, labels)
    frozen_beta = get_learner("tsa", lr_beta=1e-12, **FAST).fit_images(backbone, support, labels)
    for name, alpha in init.items():
        torch.testing.assert_close(frozen_alpha.adapters[name], alpha.detach(), rtol=0, atol=1e-9)
        assert not torch.allclose(frozen_beta.adapters[name], alpha, atol=1e-7)
    torch.testing.assert_close(frozen_beta.image_projection, torch.eye(16), rtol=0, atol=1e-9)
    assert not torch.allclose(frozen_alpha.image_projection, torch.eye(16), atol=1e-6)


def test_copa_tsa_adapters_learn_at_lr_times_their_scale(backbone, episode):
    """Adam's first step moves each parameter by about its learning rate: lr * adapter_lr_scale for alpha."""
    support, labels, _, _ = episode
    init = identity_adapters(backbone, [2, 3])
    for scale in (0.1, 0.5):
        head = get_learner("copa+tsa", steps=1, lr=1e-3, adapter_lr_scale=scale, weight_decay=0.0).fit_images(
            backbone, support, labels
        )
        step = max(float((head.adapters[n] - init[n].detach()).abs().max()) for n in init)
        assert step == pytest.approx(1e-3 * scale, rel=1e-3)
        assert float((head.image_projection - torch.eye(16)).abs().max()) == pytest.approx(1e-3, rel=1e-3)


def test_copa_tsa_needs_stages_2_and_3(episode):
    small = tiny_backbone(depths=[1], hidden_sizes=[8], image_size=32)
    with pytest.raises(ValueError, match="stages 1..1"):
        get_learner("copa+tsa", **FAST).fit_images(small, episode[0], episode[1])


def test_adaptation_runs_in_the_backbones_dtype(episode):
    model = tiny_backbone().double()
    head = get_learner("tsa", **FAST).fit_images(model, episode[0], episode[1])
    assert head.prototypes.dtype == torch.float64
    assert all(alpha.dtype == torch.float64 for alpha in head.adapters.values())


@pytest.mark.parametrize("method", BACKBONE_METHODS)
def test_features_are_refused_with_a_pointer_to_the_images_api(method):
    features, labels = torch.rand(6, 16), [0, 1, 2] * 2
    with pytest.raises(TypeError, match=r"support images.*CopaModel.adapt"):
        hf_copa.adapt(features, labels, method=method)
    with pytest.raises(TypeError, match="fit_images"):
        get_learner(method).fit(features, labels)


@pytest.mark.parametrize(
    ("pixel_values", "labels", "error", "phrase"),
    [
        (torch.rand(6, 3, 32), [0, 1] * 3, ValueError, r"\[N, 3, H, W\]"),
        (torch.rand(4, 1, 32, 32), [0, 1] * 2, ValueError, r"\[N, 3, H, W\]"),
        (torch.rand(0, 3, 32, 32), [], ValueError, "empty"),
        (torch.full((4, 3, 32, 32), float("nan")), [0, 1] * 2, ValueError, "NaN"),
        (torch.rand(4, 3, 32, 32), [0, 1, 0], ValueError, "4 support images but 3 labels"),
        (torch.rand(4, 3, 32, 32), [0] * 4, ValueError, "single class"),
        (torch.rand(4, 3, 32, 32), ["a", "b"] * 2, TypeError, "integers"),
    ],
)
def test_bad_support_images_are_rejected_clearly(backbone, pixel_values, labels, error, phrase):
    with pytest.raises(error, match=phrase):
        get_learner("tsa", **FAST).fit_images(backbone, pixel_values, labels)


@pytest.mark.parametrize("method", BACKBONE_METHODS)
def test_defaults_and_presets_are_the_papers(method):
    assert get_learner(method).hyperparameters == ADAPTATION_DEFAULTS[method]
    expected = {
        "tsa": {"seen": (0.05, 0.1), "unseen": (0.5, 1.0)},
        "copa+tsa": {
            "default": (1e-3, 0.1, 0.1),
            "high-lr": (5e-3, 0.5, 0.0),
            "high-lr-wd": (5e-3, 0.5, 0.1),
            "1-shot": (1e-4, 0.1, 0.1),
            "high-lr-1-shot": (5e-4, 0.5, 0.0),
            "high-lr-wd-1-shot": (5e-4, 0.5, 0.1),
        },
    }[method]
    assert set(ADAPTATION_PRESETS[method]) == set(expected)
    keys = ("lr", "lr_beta") if method == "tsa" else ("lr", "adapter_lr_scale", "weight_decay")
    for preset, values in expected.items():
        hp = get_learner(method, preset=preset).hyperparameters
        assert tuple(hp[k] for k in keys) == pytest.approx(values), preset
        assert hp["steps"] == 40


# --- through CopaModel.adapt, the classifier and the artifact ------------------------------------------


def as_images(pixel_values: torch.Tensor) -> list[np.ndarray]:
    return [((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8) for x in pixel_values]


@pytest.mark.parametrize("method", BACKBONE_METHODS)
def test_adapted_classifier_scores_queries_through_its_adapters(method, backbone, episode, tmp_path):
    support, labels, query, query_labels = episode
    names = ["circle", "square", "star"]
    classifier = backbone.adapt(as_images(support), [names[i] for i in labels], method=method, steps=10)
    head = classifier.head
    assert classifier.labels == sorted(names)
    images = as_images(query)
    pixel_values = backbone.default_image_processor()(images, return_tensors="pt")["pixel_values"]
    expected = head.logits(backbone.extract_features(pixel_values, adapters=head.adapters))
    torch.testing.assert_close(classifier.logits(images), expected)
    torch.testing.assert_close(classifier(pixel_values).logits, expected)
    plain = head.logits(backbone.extract_features(pixel_values))
    assert not torch.allclose(plain, expected, atol=1e-4)  # the adapters matter
    predicted = [p[0]["label"] for p in classifier.predict(images)]
    assert predicted == [names[i] for i in query_labels]

    classifier.save_pretrained(tmp_path / "head")
    loaded = hf_copa.CopaForFewShotClassification.from_pretrained(tmp_path / "head", base_model=backbone)
    assert sorted(loaded.head.adapters) == sorted(head.adapters)
    torch.testing.assert_close(loaded.logits(images), expected, rtol=0, atol=0)


def test_a_tsa_head_refuses_a_backbone_of_another_shape(backbone, episode, tmp_path):
    support, labels, _, _ = episode
    classifier = backbone.adapt(as_images(support), labels.tolist(), method="tsa", steps=1)
    classifier.save_pretrained(tmp_path / "head")
    other = tiny_backbone(hidden_sizes=[8, 16, 16, 16])
    with pytest.raises(ValueError, match="another backbone"):
        hf_copa.CopaForFewShotClassification.from_pretrained(tmp_path / "head", base_model=other)


def test_adapt_forwards_tsa_hyperparameters_and_rejects_foreign_ones(backbone, episode):
    support, labels, _, _ = episode
    images = as_images(support)
    classifier = backbone.adapt(images, labels.tolist(), method="tsa", preset="seen", steps=2)
    assert classifier.head.hyperparameters == {
        **ADAPTATION_DEFAULTS["tsa"],
        "lr": 0.05,
        "lr_beta": 0.1,
        "steps": 2,
    }
    with pytest.raises(TypeError, match="weight_decay"):
        backbone.adapt(images, labels.tolist(), method="tsa", weight_decay=0.1)
    with pytest.raises(ValueError, match="3 labels"):
        backbone.adapt(images, labels.tolist()[:3], method="copa+tsa")


def test_cosine_of_the_head_is_what_the_official_query_scoring_computes(backbone, episode):
    """logits = 10 * cos(q Theta_I^T, p Theta_P^T): the official `F.cosine_similarity(...) * 10`."""
    support, labels, query, _ = episode
    head = get_learner("copa+tsa", **FAST).fit_images(backbone, support, labels)
    q = backbone.extract_features(query, adapters=head.adapters) @ head.image_projection.T
    p = head.prototypes @ head.prototype_projection.T
    expected = 10 * F.cosine_similarity(q.unsqueeze(1), p.unsqueeze(0), dim=-1, eps=1e-30)
    torch.testing.assert_close(
        head.logits(backbone.extract_features(query, adapters=head.adapters)), expected
    )
