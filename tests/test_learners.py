"""The learner contract, checked for every registered method, plus `hf_copa.adapt`'s input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hf_copa
from hf_copa import (
    ADAPTATION_DEFAULTS,
    ADAPTATION_PRESETS,
    AdaptedHead,
    Learner,
    get_learner,
    register_learner,
)
from hf_copa.learners import registry as learner_registry

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = hf_copa.available_methods()
# The contract on pooled features; learners that adapt the backbone itself (TSA) have theirs in test_tsa.py,
# learners on feature maps (CoPA's transformer head) in test_new_methods.py.
FEATURE_METHODS = [
    m for m in METHODS if not get_learner(m).needs_backbone and get_learner(m).feature_kind == "pooled"
]
DIM = 32
FAST_STEPS = 5  # enough to move the heads away from the identity, cheap on 2 cores
# Finetune starts from a random classifier and moves it by about lr per Adam step: it needs more steps to
# separate even an easy task (its default is 200).
FAST_STEPS_OF = {"finetune": 50}


def fast_hyperparameters(method: str) -> dict:
    if "steps" not in ADAPTATION_DEFAULTS.get(method, {}):
        return {}
    return {"steps": FAST_STEPS_OF.get(method, FAST_STEPS)}


def fast_learner(method: str, **hyperparameters) -> Learner:
    return get_learner(method, **{**fast_hyperparameters(method), **hyperparameters})


def clustered_task(
    shots_per_class: list[int], queries_per_class: int = 2, dim: int = DIM, seed: int = 0, spread: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-negative features around a random centre per class, shuffled: (support, labels, query, labels)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(len(shots_per_class), dim, generator=generator) * 3

    def sample(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        labels = labels[torch.randperm(len(labels), generator=generator)]
        noise = spread * torch.rand(len(labels), dim, generator=generator)
        return (centres[labels] + noise).clamp(min=0), labels

    support, support_labels = sample(shots_per_class)
    query, query_labels = sample([queries_per_class] * len(shots_per_class))
    return support, support_labels, query, query_labels


@pytest.fixture(scope="module")
def task() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return clustered_task([3, 2, 3, 1])


# --- the contract, for every method ---------------------------------------------------------------------


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_fit_returns_a_head_whose_logits_are_query_by_class(method, task):
    support, labels, query, _ = task
    head = fast_learner(method).fit(support, labels)
    assert isinstance(head, AdaptedHead)
    assert head.method == method
    assert head.num_classes == 4
    assert head.feature_dim == DIM
    logits = head.logits(query)
    assert logits.shape == (len(query), 4)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_fit_is_deterministic(method, task):
    support, labels, query, _ = task
    first = fast_learner(method).fit(support, labels)
    second = fast_learner(method).fit(support, labels)
    assert torch.equal(first.logits(query), second.logits(query))
    assert first.train_losses == second.train_losses


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_fit_batch_of_padded_episodes_equals_fitting_each_alone(method):
    episodes = [
        clustered_task([1, 1], seed=1),  # 2-way 1-shot
        clustered_task([3, 2, 3, 1, 2], seed=2),  # 5-way, variable shot: the largest episode
        clustered_task([4, 4, 4], seed=3),  # 3-way 4-shot
    ]
    longest = max(len(support) for support, *_ in episodes)
    num_classes = max(int(labels.max()) + 1 for _, labels, *_ in episodes)
    # Padding rows hold finite garbage: a learner must ignore them, not rely on them being zero.
    features = torch.rand(len(episodes), longest, DIM, generator=torch.Generator().manual_seed(9)) * 5
    padded_labels = torch.full((len(episodes), longest), -1)
    for b, (support, labels, _, _) in enumerate(episodes):
        features[b, : len(support)] = support
        padded_labels[b, : len(labels)] = labels

    learner = fast_learner(method)
    heads = learner.fit_batch(features, padded_labels, num_classes)

    assert len(heads) == len(episodes)
    for head, (support, labels, query, _) in zip(heads, episodes, strict=True):
        alone = learner.fit(support, labels)
        assert head.num_classes == alone.num_classes == int(labels.max()) + 1
        torch.testing.assert_close(head.logits(query), alone.logits(query), rtol=0, atol=1e-5)
        assert len(head.train_losses) == len(alone.train_losses)
        np.testing.assert_allclose(head.train_losses, alone.train_losses, rtol=1e-5)


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_all_zero_features_give_finite_logits(method):
    support = torch.zeros(6, DIM)
    head = fast_learner(method).fit(support, torch.tensor([0, 1, 2, 0, 1, 2]))
    logits = head.logits(torch.zeros(3, DIM))
    assert logits.shape == (3, 3)
    assert torch.isfinite(logits).all()
    assert all(math.isfinite(loss) for loss in head.train_losses)


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_a_separable_task_is_classified_correctly(method):
    support, labels, query, query_labels = clustered_task([5, 5, 5, 5, 5], queries_per_class=4, seed=4)
    head = fast_learner(method).fit(support, labels)
    assert torch.equal(head.logits(query).argmax(dim=1), query_labels)


@pytest.mark.parametrize("method", [m for m in FEATURE_METHODS if "steps" in ADAPTATION_DEFAULTS.get(m, {})])
def test_optimising_learners_record_one_loss_per_step_and_reduce_it(method):
    # Overlapping classes at a small scale, so that no method starts at zero loss (proto-MAML's logits grow
    # with the squared feature norm: it separates the module's well-clustered task perfectly).
    support, labels, _, _ = clustered_task([3, 2, 3, 1], spread=3.0, seed=11)
    head = fast_learner(method, steps=8).fit(0.1 * support, labels)
    assert len(head.train_losses) == 8
    assert head.train_losses[-1] < head.train_losses[0]


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_numpy_inputs_are_accepted(method, task):
    support, labels, query, _ = task
    from_torch = fast_learner(method).fit(support, labels).logits(query)
    from_numpy = fast_learner(method).fit(support.numpy(), labels.numpy()).logits(query.numpy())
    torch.testing.assert_close(from_numpy, from_torch, rtol=0, atol=0)
    from_float64 = hf_copa.adapt(
        support.double().numpy(), labels.tolist(), method=method, **fast_hyperparameters(method)
    ).logits(query.double().numpy())
    torch.testing.assert_close(from_float64.float(), from_torch, rtol=0, atol=1e-4)


def _cosine_rule(method: str) -> bool:
    """Whether `method`'s heads are the cosine rule (projections that start as the identity)."""
    head = get_learner(method, **fast_hyperparameters(method)).fit(torch.rand(4, DIM), [0, 1, 0, 1])
    return type(head) is AdaptedHead


@pytest.mark.parametrize(
    "method",
    [m for m in FEATURE_METHODS if m != "ncc" and "steps" in ADAPTATION_DEFAULTS[m] and _cosine_rule(m)],
)
def test_zero_steps_leave_identity_heads_and_give_ncc_predictions(method, task):
    support, labels, query, _ = task
    head = get_learner(method, steps=0).fit(support, labels)
    ncc = get_learner("ncc").fit(support, labels)
    assert head.train_losses == []
    eye = torch.eye(DIM)
    for projection in (head.image_projection, head.prototype_projection):
        assert projection is None or torch.equal(projection, eye)
    torch.testing.assert_close(head.logits(query), ncc.logits(query), rtol=0, atol=1e-6)


def test_adapt_defaults_to_copa(task):
    support, labels, _, _ = task
    assert hf_copa.adapt(support, labels, steps=1).method == "copa"


# --- hyperparameters, presets, method names -------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_unknown_hyperparameter_is_a_type_error_naming_it(method):
    with pytest.raises(TypeError, match="learning_rate"):
        get_learner(method, learning_rate=0.1)
    with pytest.raises(TypeError, match="learning_rate"):
        hf_copa.adapt(torch.rand(4, DIM), [0, 1, 0, 1], method=method, learning_rate=0.1)


BAD_VALUES = {
    "steps": [-1, 1.5, True, "10"],
    "lr": [-0.1, 0, float("nan"), float("inf"), "fast"],
    "scale": [0, -10.0, float("nan"), float("inf")],
    "weight_decay": [-0.1, float("nan"), float("inf")],
    "tau": ["2", float("nan"), float("inf")],
    "lr_beta": [0, -1.0, float("nan")],
    "adapter_lr_scale": [0, -0.5, float("inf")],
    "beta": [0, -1.0, float("nan")],
    "seed": [-1, 0.5, True],
    "heads": [0, -2, 2.0],
    "blocks": [0, 1.5],
    "optimizer": ["sgd", 1],
    "classifier": ["softmax", True],
    "weight_norm": ["yes", 1, 0.0],
}
BAD_CASES = [
    pytest.param(method, name, value, id=f"{method}-{name}={value!r}")
    for method in METHODS
    for name in ADAPTATION_DEFAULTS.get(method, {})
    for value in BAD_VALUES.get(name, [])
]


@pytest.mark.parametrize(("method", "name", "value"), BAD_CASES)
def test_bad_hyperparameter_values_are_value_errors_naming_the_field(method, name, value):
    with pytest.raises(ValueError, match=name):
        get_learner(method, **{name: value})


@pytest.mark.parametrize("method", [m for m in METHODS if m in ADAPTATION_DEFAULTS])
def test_learners_start_from_the_documented_defaults(method):
    assert get_learner(method).hyperparameters == ADAPTATION_DEFAULTS[method]


@pytest.mark.parametrize(
    ("method", "preset", "expected"),
    [
        ("url", "seen", {"lr": 0.1}),
        ("url", "unseen", {"lr": 1.0}),
        ("copa", "high-lr", {"lr": 5e-3, "weight_decay": 0.0}),
        ("copa", "default", {}),
    ],
)
def test_presets_change_the_hyperparameters_as_documented(method, preset, expected):
    assert ADAPTATION_PRESETS[method][preset] == expected
    hyperparameters = get_learner(method, preset=preset).hyperparameters
    assert hyperparameters == {**ADAPTATION_DEFAULTS[method], **expected}


def test_a_preset_fits_the_same_head_as_its_explicit_hyperparameters(task):
    support, labels, query, _ = task
    seen = hf_copa.adapt(support, labels, method="url", preset="seen", steps=3)
    explicit = hf_copa.adapt(support, labels, method="url", lr=0.1, steps=3)
    unseen = hf_copa.adapt(support, labels, method="url", preset="unseen", steps=3)
    assert torch.equal(seen.logits(query), explicit.logits(query))
    assert not torch.equal(seen.logits(query), unseen.logits(query))
    assert seen.hyperparameters["lr"] == 0.1


def test_explicit_keywords_override_a_preset():
    hyperparameters = get_learner("copa", preset="high-lr", lr=0.02).hyperparameters
    assert hyperparameters["lr"] == 0.02
    assert hyperparameters["weight_decay"] == 0.0


@pytest.mark.parametrize("method", [m for m in METHODS if m in ADAPTATION_PRESETS])
def test_unknown_preset_is_a_value_error_listing_the_choices(method):
    with pytest.raises(ValueError, match="no-such-preset") as raised:
        get_learner(method, preset="no-such-preset")
    for choice in ADAPTATION_PRESETS[method]:
        assert repr(choice) in str(raised.value)


def test_unknown_method_is_a_value_error_listing_the_choices():
    for call in (
        lambda: get_learner("maml"),
        lambda: hf_copa.adapt(torch.rand(4, DIM), [0, 1, 0, 1], "maml"),
    ):
        with pytest.raises(ValueError, match="maml") as raised:
            call()
        for method in METHODS:
            assert repr(method) in str(raised.value)


# --- bad input through hf_copa.adapt --------------------------------------------------------------------


def _support(n: int = 6) -> torch.Tensor:
    return torch.rand(n, DIM, generator=torch.Generator().manual_seed(5))


def _with_value(row: int, value: float) -> torch.Tensor:
    features = _support()
    features[row, 3] = value
    return features


BAD_SUPPORT = {
    "empty support": (torch.zeros(0, DIM), [], ValueError, "empty"),
    "single class": (_support(), [0] * 6, ValueError, "single class"),
    "more labels than features": (
        _support(),
        [0, 1, 0, 1, 0, 1, 0],
        ValueError,
        "6 support features but 7 labels",
    ),
    "fewer labels than features": (
        _support(),
        [0, 1, 0, 1, 0],
        ValueError,
        "6 support features but 5 labels",
    ),
    "class with no example": (
        _support(),
        [0, 2, 0, 2, 0, 2],
        ValueError,
        r"classes \[1\] have no support example",
    ),
    "negative label": (_support(), [0, 1, -1, 1, 0, 1], ValueError, "found -1"),
    "float labels": (_support(), [0.0, 1.0, 0.0, 1.0, 0.0, 1.0], TypeError, "integers"),
    "bool labels": (_support(), [True, False] * 3, TypeError, "integers"),
    "string labels": (_support(), ["cat", "dog"] * 3, TypeError, "integers"),
    "2-D labels": (_support(), [[0, 1, 0], [1, 0, 1]], ValueError, "1-D"),
    "1-D features": (torch.rand(DIM), [0, 1], ValueError, r"shape \[N, d\]"),
    "3-D features": (torch.rand(1, 6, DIM), [0, 1, 0, 1, 0, 1], ValueError, r"shape \[N, d\]"),
    "NaN feature": (_with_value(2, float("nan")), [0, 1] * 3, ValueError, "NaN or infinite"),
    "infinite feature": (_with_value(4, float("-inf")), [0, 1] * 3, ValueError, "NaN or infinite"),
    "features not an array": ("features", [0, 1] * 3, TypeError, "torch.Tensor or numpy array"),
}


@pytest.mark.parametrize("method", FEATURE_METHODS)
@pytest.mark.parametrize("case", list(BAD_SUPPORT))
def test_bad_support_is_rejected_with_a_message_saying_what_is_wrong(method, case):
    features, labels, error, phrase = BAD_SUPPORT[case]
    with pytest.raises(error, match=phrase):
        hf_copa.adapt(features, labels, method=method, **fast_hyperparameters(method))


BAD_QUERY = {
    "wrong feature dimension": (torch.rand(3, DIM + 1), "dimension 33"),
    "empty query": (torch.zeros(0, DIM), "empty"),
    "NaN query": (torch.full((2, DIM), float("nan")), "NaN or infinite"),
    "infinite query": (torch.full((2, DIM), float("inf")), "NaN or infinite"),
    "1-D query": (torch.rand(DIM), r"shape \[N, d\]"),
}


@pytest.mark.parametrize("method", FEATURE_METHODS)
@pytest.mark.parametrize("case", list(BAD_QUERY))
def test_bad_query_is_rejected_with_a_message_saying_what_is_wrong(method, case, task):
    support, labels, _, _ = task
    head = hf_copa.adapt(support, labels, method=method, **fast_hyperparameters(method))
    query, phrase = BAD_QUERY[case]
    with pytest.raises(ValueError, match=phrase):
        head.logits(query)


# --- the registry ---------------------------------------------------------------------------------------

CUSTOM = "nearest-support-test"


@pytest.fixture
def custom_learner_name():
    """Registers nothing itself; removes whatever a test registered under CUSTOM so nothing leaks."""
    yield CUSTOM
    learner_registry._LEARNERS.pop(CUSTOM, None)


def test_register_learner_makes_a_custom_learner_available_through_adapt(custom_learner_name, task):
    support, labels, query, query_labels = task

    @register_learner(custom_learner_name)
    class DoubledNCC(Learner):
        """NCC with twice the logit scale: easy to tell apart from the built-in methods."""

        def fit_batch(self, features, labels, num_classes):
            heads = get_learner("ncc").fit_batch(features, labels, num_classes)
            return [AdaptedHead(head.prototypes, scale=2 * head.scale, method=self.name) for head in heads]

    assert custom_learner_name in hf_copa.available_methods()
    head = hf_copa.adapt(support, labels, method=custom_learner_name)
    assert head.method == custom_learner_name
    ncc = hf_copa.adapt(support, labels, method="ncc")
    torch.testing.assert_close(head.logits(query), 2 * ncc.logits(query))
    with pytest.raises(TypeError, match="lr"):
        hf_copa.adapt(support, labels, method=custom_learner_name, lr=0.1)


def test_register_learner_with_its_own_init_works_through_adapt(custom_learner_name, task):
    support, labels, query, _ = task

    @register_learner(custom_learner_name)
    class PlainNCC(Learner):
        def __init__(self, preset=None, **hyperparameters):
            self.hyperparameters = dict(hyperparameters)

        def fit_batch(self, features, labels, num_classes):
            return get_learner("ncc").fit_batch(features, labels, num_classes)

    head = hf_copa.adapt(support, labels, method=custom_learner_name)
    torch.testing.assert_close(head.logits(query), hf_copa.adapt(support, labels, method="ncc").logits(query))


def test_registering_a_taken_name_is_an_error():
    with pytest.raises(ValueError, match="copa"):

        @register_learner("copa")
        class Duplicate(Learner):
            pass

    assert learner_registry._LEARNERS["copa"].__name__ != "Duplicate"
