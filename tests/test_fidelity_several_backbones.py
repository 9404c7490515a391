"""SUR and URT, hf_copa's several-backbone learners, against plain float64 transcriptions of the official code
(`tests.support.official`: dvornikita/SUR `models/sur.py`, `models/losses.py`, `test.py`; liulu112601/URT
`fast-exps/lib/models/new_prop_prototype.py`, `fast-exps/urt-avg-head.py`).

The episodes are random features of several backbones ([N, B, d], B = 3..8, d = 16..64, 2..10 classes with
uneven shots, labels shuffled), some backbones carrying more class signal than others, so that SUR's
selection and URT's scores are far from uniform. In float64 round-off cannot steer the two sides apart, so
they must agree to ~1e-10 or better: SUR's 40 Adadelta steps, URT's forward pass, its learner's logits and
its training steps (loss, every gradient, Adam + cosine annealing).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import hf_copa
import hf_copa.cli
from hf_copa.learners import get_learner
from hf_copa.learners.sur import fit_selection
from hf_copa.learners.urt import URTLayer, head_diversity_penalty, save_urt_layer
from hf_copa.losses import combine_backbones
from hf_copa.training.urt import episode_loss
from tests.support.official import (
    OfficialMultiHeadURT,
    official_apply_selection,
    official_apply_urt_avg_selection,
    official_get_cosine_logits,
    official_get_lambda_urt_avg,
    official_sur,
    official_sur_test_episode,
    official_urt_episode,
    official_urt_optimizer,
    official_urt_penalty,
    official_urt_test_logits,
    official_urt_train_step,
)

# (seed, backbones, feature size, classes)
EPISODES = [(0, 3, 16, 2), (1, 5, 32, 5), (2, 8, 24, 10), (3, 4, 64, 3)]
SUR_STEPS, SUR_LR_TIMES_CLASSES, SUR_SCALE = 40, 3000.0, 10.0  # sur.py l. 30, test.py l. 57, losses.py l. 30
URT_LR, URT_WEIGHT_DECAY, URT_PENALTY = 1e-2, 1e-5, 0.1  # fast-scripts/urt-avg-head.sh l. 38-39; README l. 36


def make_episode(seed: int, backbones: int, dim: int, classes: int, dtype=torch.float64):
    """(support [N, B, d], labels [N], query [M, B, d], query labels [M]): every class present in both, 1..6
    support and 1..4 query images per class, shuffled; backbone b's features are s_b * centre + noise + a
    per-backbone offset, s_b in [0, 2), so backbones differ in how much they separate the classes."""
    g = torch.Generator().manual_seed(1000 + seed)
    centres = torch.randn(backbones, classes, dim, generator=g, dtype=torch.float64)
    strength = 2 * torch.rand(backbones, generator=g, dtype=torch.float64)
    offset = 0.5 * torch.randn(backbones, dim, generator=g, dtype=torch.float64)

    def draw(low: int, high: int):
        counts = torch.randint(low, high + 1, (classes,), generator=g)
        labels = torch.repeat_interleave(torch.arange(classes), counts)
        labels = labels[torch.randperm(len(labels), generator=g)]
        noise = torch.randn(len(labels), backbones, dim, generator=g, dtype=torch.float64)
        features = strength.view(1, -1, 1) * centres[:, labels].transpose(0, 1) + noise + offset
        return features.to(dtype), labels

    support, labels = draw(1, 6)
    query, query_labels = draw(1, 4)
    return support, labels, query, query_labels


def as_dict(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """SUR's features dict (backbone name -> [N, d]) in the set's order."""
    return {f"backbone_{b}": features[:, b] for b in range(features.shape[1])}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --- SUR -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", EPISODES)
def test_sur_selection_matches_official_loop(case):
    support, labels, _, _ = make_episode(*case)
    official_lambdas, official_losses = official_sur(as_dict(support), labels, max_iter=SUR_STEPS)
    lambdas, losses = fit_selection(support, labels, SUR_STEPS, SUR_LR_TIMES_CLASSES, SUR_SCALE)
    official_lambdas = official_lambdas.detach().view(-1)
    assert lambdas.dtype == torch.float64 and lambdas.shape == (case[1],)
    assert relative(lambdas, official_lambdas) < 1e-10
    assert len(losses) == SUR_STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(official_losses), rtol=1e-10, atol=0)
    assert official_losses[-1] < official_losses[0]  # the loop did move the lambdas
    assert float(official_lambdas.max() - official_lambdas.min()) > 0.5  # and not all alike


@pytest.mark.parametrize("case", EPISODES)
def test_sur_query_logits_match_official_test_path(case):
    support, labels, query, query_labels = make_episode(*case)
    lambdas, logits, accuracy, losses = official_sur_test_episode(
        as_dict(support), labels, as_dict(query), query_labels
    )
    head = hf_copa.adapt(support, labels, method="sur")
    ours = head.logits(query)
    assert ours.dtype == torch.float64 and ours.shape == logits.shape == (len(query), case[3])
    assert relative(ours, logits) < 1e-10
    torch.testing.assert_close(head.selection, torch.sigmoid(lambdas.view(-1, 1)), rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.tensor(head.train_losses), torch.tensor(losses), rtol=1e-10, atol=0)
    assert head.scale == SUR_SCALE and head.cosine_eps == 1e-30 and head.combination == "concatenate"
    assert float((ours.argmax(1) == query_labels).double().mean()) == pytest.approx(accuracy)


def test_sur_concatenation_is_the_official_interleaved_order():
    """`apply_selection` stacks on a new last axis: element j of every backbone, then element j + 1. Cosines
    cannot tell the order (the same permutation of both sides), so compare the vectors themselves."""
    support, _, _, _ = make_episode(5, 4, 8, 3)
    lambdas = torch.randn(1, 1, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    official = official_apply_selection(as_dict(support), lambdas)
    ours = combine_backbones(support, torch.sigmoid(lambdas.view(-1, 1)), "concatenate")
    assert ours.shape == official.shape == (len(support), 4 * 8)
    torch.testing.assert_close(ours, official, rtol=1e-15, atol=0)
    # [N, d * B]: position j * B + b holds backbone b's element j, weighted by sigmoid(lambda_b).
    unit = support / support.norm(dim=-1, keepdim=True)
    for b in range(4):
        torch.testing.assert_close(ours[:, b::4], unit[:, b] * torch.sigmoid(lambdas[0, 0, b]))
    blocks = (unit * torch.sigmoid(lambdas.view(1, -1, 1))).reshape(
        len(support), -1
    )  # backbone after backbone
    assert not torch.allclose(ours, blocks)
    # and the head fitted by the learner stores and combines in that order
    head = hf_copa.adapt(support, torch.arange(len(support)) % 3, method="sur")
    reference = official_apply_selection(as_dict(support), torch.logit(head.selection).view(1, 1, -1))
    torch.testing.assert_close(head.combine(support), reference, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", EPISODES)
def test_sur_float32_agrees_with_official(case):
    support, labels, query, query_labels = make_episode(*case, dtype=torch.float32)
    lambdas, logits, _, _ = official_sur_test_episode(as_dict(support), labels, as_dict(query), query_labels)
    head = hf_copa.adapt(support, labels, method="sur")
    assert head.selection.dtype == torch.float32
    torch.testing.assert_close(torch.logit(head.selection.view(-1)), lambdas.view(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head.logits(query), logits, rtol=1e-4, atol=1e-4)


# --- URT -------------------------------------------------------------------------------------------------


def layer_pair(backbones: int, dim: int, heads: int, hidden: int, seed: int, spread: float | None):
    """A float32 hf_copa `URTLayer` and the official `MultiHeadURT` (+ `cosine_temp`) holding the same
    values, copied from the layer's state_dict (same names, less `temperature`). spread=None keeps the
    official initialisation; otherwise every weight and bias is redrawn from N(0, spread^2) and the
    temperature set to 7.25, so that the scores are far from uniform."""
    torch.manual_seed(seed)
    layer = URTLayer(backbones, dim, heads, hidden)
    if spread is not None:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, parameter in layer.named_parameters():
                if name == "temperature":
                    parameter.fill_(7.25)
                else:
                    parameter.copy_(spread * torch.randn(parameter.shape, generator=g))
    official = OfficialMultiHeadURT(
        key_dim=dim, query_dim=backbones * dim, hid_dim=hidden, temp=1, att="dotproduct", n_head=heads
    )
    state = dict(layer.state_dict())
    cosine_temp = torch.nn.Parameter(state.pop("temperature").clone())
    official.load_state_dict(state, strict=True)
    return layer, official, cosine_temp


URT_CASES = [  # (episode, heads, hidden)
    (EPISODES[0], 1, 16),
    (EPISODES[1], 2, 24),
    (EPISODES[2], 3, 32),
    (EPISODES[3], 2, 40),
]


@pytest.mark.parametrize(("case", "heads", "hidden"), URT_CASES)
def test_urt_forward_matches_official(case, heads, hidden):
    seed, backbones, dim, classes = case
    layer, official, cosine_temp = layer_pair(backbones, dim, heads, hidden, seed, spread=1.0)
    layer, official, cosine_temp = layer.double(), official.double(), cosine_temp.detach().double()
    support, labels, query, _ = make_episode(*case)
    with torch.no_grad():
        prototypes = F.normalize(torch.randn(classes, backbones, dim, dtype=torch.float64), dim=-1)
        scores = layer(prototypes)
        assert scores.shape == (classes, backbones, heads)
        torch.testing.assert_close(scores, official(prototypes), rtol=1e-13, atol=1e-15)

        weights = layer.task_weights(support, labels)
        official_weights = official_get_lambda_urt_avg(support, labels, classes, official)
        assert weights.shape == (backbones, heads)
        torch.testing.assert_close(weights, official_weights, rtol=1e-13, atol=1e-15)
        assert float(official_weights.max() / official_weights.min()) > 2  # far from uniform

        for features in (support, query):
            torch.testing.assert_close(
                combine_backbones(features, official_weights, "sum"),
                official_apply_urt_avg_selection(features, official_weights, normalize=True),
                rtol=1e-13,
                atol=1e-15,
            )

        logits, episode_weights = layer.episode_logits(support, labels, query)
        official_logits, _ = official_urt_episode(official, cosine_temp, support, labels, query)
        torch.testing.assert_close(episode_weights, official_weights, rtol=1e-13, atol=1e-15)
        assert relative(logits, official_logits) < 1e-12


@pytest.mark.parametrize(("case", "heads", "hidden"), URT_CASES)
def test_urt_learner_logits_match_official_test_path(tmp_path, case, heads, hidden):
    """The learner reads the saved float32 layer and runs in the features' dtype: float64 features make its
    arithmetic the official test path's in float64 (the float32 values are exact in float64)."""
    seed, backbones, dim, classes = case
    layer, official, cosine_temp = layer_pair(backbones, dim, heads, hidden, seed, spread=1.0)
    identity = {
        "backbones": [f"backbone_{b}" for b in range(backbones)],
        "fingerprints": [f"{b:08x}" for b in range(backbones)],
    }
    save_urt_layer(layer, tmp_path / "urt", identity, {})
    official, cosine_temp = official.double(), cosine_temp.detach().double()
    support, labels, query, query_labels = make_episode(*case)

    head = get_learner("urt", urt_head=str(tmp_path / "urt")).fit(support, labels)
    ours = head.logits(query)
    reference = official_urt_test_logits(official, cosine_temp, support, labels, query)
    assert ours.dtype == torch.float64 and ours.shape == reference.shape == (len(query), classes)
    assert relative(ours, reference) < 1e-12
    assert head.scale == float(cosine_temp) == 7.25
    assert head.combination == "sum" and head.cosine_eps == 1e-8
    with torch.no_grad():
        official_weights = official_get_lambda_urt_avg(support, labels, classes, official)
        torch.testing.assert_close(head.selection, official_weights, rtol=1e-13, atol=1e-15)
        # the head's prototypes are the official ones: class means of the selected context features
        selected = official_apply_urt_avg_selection(support, official_weights, normalize=True)
        prototypes = torch.stack([selected[labels == c].mean(0) for c in range(classes)])
        torch.testing.assert_close(head.prototypes, prototypes, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(
            ours,
            official_get_cosine_logits(
                official_apply_urt_avg_selection(query, official_weights, True), prototypes, cosine_temp
            ),
            rtol=1e-12,
            atol=1e-12,
        )


URT_TRAINING_STEPS = 3


@pytest.mark.parametrize("spread", [None, 1.0], ids=["official-init", "random"])
def test_urt_training_steps_match_official(spread):
    """`urt-avg-head.py`'s loop (l. 186-205) against `train_urt`'s (l. 714-716, 735, 740-746 of
    hf_copa/training/urt.py, one episode a step): loss, every gradient, then the parameters after Adam and
    the scheduler, for three episodes of one backbone set."""
    backbones, dim, heads, hidden = 5, 24, 2, 32
    layer, official, cosine_temp = layer_pair(backbones, dim, heads, hidden, 11, spread)
    layer, official = layer.double(), official.double()
    cosine_temp = torch.nn.Parameter(cosine_temp.detach().double())
    optimizer = torch.optim.Adam(layer.parameters(), lr=URT_LR, weight_decay=URT_WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=URT_TRAINING_STEPS)
    official_optimizer, official_scheduler = official_urt_optimizer(
        official, cosine_temp, URT_LR, URT_WEIGHT_DECAY, URT_TRAINING_STEPS
    )
    official_parameters = {**dict(official.named_parameters()), "temperature": cosine_temp}
    assert set(official_parameters) == {name for name, _ in layer.named_parameters()}

    for step, classes in enumerate((4, 2, 7)):
        support, labels, query, query_labels = make_episode(20 + step, backbones, dim, classes)
        loss = torch.stack([episode_loss(layer, support, labels, query, query_labels, URT_PENALTY)]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        official_loss = official_urt_train_step(
            official,
            cosine_temp,
            official_optimizer,
            official_scheduler,
            support,
            labels,
            query,
            query_labels,
            n_head=heads,
            penalty_coef=URT_PENALTY,
        )
        assert float(loss.detach()) == pytest.approx(float(official_loss), rel=1e-12, abs=0)
        # linear_k's bias has gradient 0 in exact arithmetic (q . b_k is the same for every backbone and the
        # softmax over backbones ignores a common shift), so both sides hold round-off there (~1e-17) and only
        # the absolute bound applies; Adam still moves it alike, as weight decay (1e-5 * b_k) dominates it.
        for h in range(heads):
            assert float(official_parameters[f"layers.{h}.linear_k.bias"].grad.abs().max()) < 1e-15
        for name, parameter in layer.named_parameters():
            reference = official_parameters[name]
            torch.testing.assert_close(parameter.grad, reference.grad, rtol=1e-10, atol=1e-15, msg=name)
            torch.testing.assert_close(
                parameter.detach(), reference.detach(), rtol=1e-11, atol=1e-13, msg=name
            )
        assert scheduler.get_last_lr() == official_scheduler.get_last_lr()
    assert float(layer.temperature.detach()) not in (7.25, 10.0)  # it trained


def test_urt_initialisation_is_the_official_one():
    """URTPropagation.__init__ (l. 41-52): nn.Linear weights redrawn from N(0, 0.001^2), biases PyTorch's
    default U(-1/sqrt(fan_in), 1/sqrt(fan_in)); MultiHeadURT temp=1 (urt-avg-head.py l. 155); cosine_temp
    starts at 10 (l. 158). From one seed the official module draws the very same numbers."""
    backbones, dim, heads, hidden = 8, 64, 2, 256
    torch.manual_seed(3)
    layer = URTLayer(backbones, dim, heads, hidden)
    torch.manual_seed(3)
    official = OfficialMultiHeadURT(dim, backbones * dim, hidden, temp=1, att="dotproduct", n_head=heads)
    state = layer.state_dict()
    assert float(state.pop("temperature")) == 10.0
    assert state.keys() == official.state_dict().keys()
    for name, tensor in official.state_dict().items():
        assert torch.equal(state[name], tensor), name
    for head in layer.layers:
        assert head.attention_temperature == 1
        for linear in (head.linear_q, head.linear_k):
            weight = linear.weight.detach().double()
            assert abs(float(weight.std()) - 0.001) < 0.05 * 0.001  # >= 16k draws: ~1% sampling error
            assert abs(float(weight.mean())) < 1e-4
            bound = 1 / math.sqrt(linear.in_features)
            bias = linear.bias.detach().double()
            assert float(bias.abs().max()) <= bound
            assert float(bias.std()) == pytest.approx(bound / math.sqrt(3), rel=0.25)
    assert (
        layer.layers[0].linear_q.in_features == backbones * dim
        and layer.layers[0].linear_k.in_features == dim
    )


def test_urt_penalty_is_the_official_frobenius_norm():
    g = torch.Generator().manual_seed(4)
    for backbones, heads in ((3, 1), (5, 2), (8, 4)):
        weights = torch.softmax(3 * torch.randn(backbones, heads, generator=g, dtype=torch.float64), dim=0)
        direct = ((weights.T @ weights - torch.eye(heads, dtype=torch.float64)) ** 2).sum()
        ours = head_diversity_penalty(weights)
        torch.testing.assert_close(ours, direct, rtol=1e-14, atol=0)
        torch.testing.assert_close(ours, official_urt_penalty(weights, heads), rtol=1e-14, atol=0)


# --- an official URT checkpoint, converted ----------------------------------------------------------------


def official_urt_checkpoint(path, official: torch.nn.Module, cosine_temp: torch.Tensor, drop: str = ""):
    """What `urt-avg-head.py` saves at its last iteration (l. 219-223): args, train_iter, the optimizer's and
    scheduler's states, and the `DataParallel(MultiHeadURT)` state_dict (`module.` names, each head's
    `linear_v_w`, l. 46: eight identity matrices). The cosine temperature is not among them."""
    optimizer, scheduler = official_urt_optimizer(official, cosine_temp, URT_LR, URT_WEIGHT_DECAY, 10000)
    state = {f"module.{name}": tensor for name, tensor in official.state_dict().items()}
    for head in range(len(official.layers)):
        key_dim = official.layers[head].linear_k.in_features
        state[f"module.layers.{head}.linear_v_w"] = torch.eye(key_dim).unsqueeze(0).repeat(8, 1, 1)
    state.pop(drop, None)
    args = {"urt.head": len(official.layers), "urt.penalty_coef": URT_PENALTY, "train.max_iter": 10000}
    info = {
        "args": {**args, "train.learning_rate": URT_LR, "save_dir": "./fast-outputs/urt-avg-head"},
        "train_iter": 9999,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "URT_model": state,
    }
    torch.save(info, path)
    return path


def test_an_official_urt_checkpoint_converts_and_scores_as_the_official_test_path(tmp_path):
    """`hf-copa convert CKPT OUT --backbone-set SET`: the converted layer, used by the urt learner, gives the
    official test path's logits (float64 features) with the temperature given for the one not saved."""
    from tests.test_backbone_set import make_set

    backbone_set = make_set()
    backbone_set.save_pretrained(tmp_path / "set")
    backbones, dim = backbone_set.num_backbones, backbone_set.feature_dim
    _, official, cosine_temp = layer_pair(backbones, dim, 2, 32, 5, spread=1.0)
    checkpoint = official_urt_checkpoint(tmp_path / "ckp-seed-1-iter-9999.pth", official, cosine_temp)
    out = tmp_path / "urt"
    command = ["convert", str(checkpoint), str(out), "--backbone-set", str(tmp_path / "set")]
    assert hf_copa.cli.main([*command, "--temperature", "7.25"]) == 0

    support, labels, query, _ = make_episode(7, backbones, dim, 4)
    head = get_learner("urt", urt_head=str(out)).fit(support, labels)
    reference = official_urt_test_logits(
        official.double(), cosine_temp.detach().double(), support, labels, query
    )
    assert relative(head.logits(query), reference) < 1e-12 and head.scale == 7.25
    config = json.loads((out / "urt_config.json").read_text())
    assert config["backbone_set"] == backbone_set.identity() and config["heads"] == 2
    assert config["training"]["train_iter"] == 9999 and config["training"]["urt.penalty_coef"] == URT_PENALTY
    assert "ckp-seed-1-iter-9999.pth" in (out / "README.md").read_text()
    # the default temperature is the initial one, and the accuracies do not depend on it
    assert hf_copa.cli.main([*command[:2], str(tmp_path / "urt10"), *command[3:]]) == 0
    default = get_learner("urt", urt_head=str(tmp_path / "urt10")).fit(support, labels)
    assert default.scale == 10.0
    assert torch.equal(default.logits(query).argmax(1), head.logits(query).argmax(1))


def test_urt_checkpoints_that_do_not_convert_say_why(tmp_path, capsys):
    from tests.test_backbone_set import make_set

    backbone_set = make_set()
    backbone_set.save_pretrained(tmp_path / "set")
    make_set(seeds=(0, 1), names=["ilsvrc_2012", "omniglot"]).save_pretrained(tmp_path / "two")
    _, official, cosine_temp = layer_pair(backbone_set.num_backbones, backbone_set.feature_dim, 2, 32, 5, 1.0)
    checkpoint = official_urt_checkpoint(tmp_path / "ckp.pth", official, cosine_temp)
    damaged = official_urt_checkpoint(
        tmp_path / "damaged.pth", official, cosine_temp, "module.layers.1.linear_k.bias"
    )
    backbone = tmp_path / "backbone.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "args": {}}, backbone)
    never = str(tmp_path / "never")
    cases = [
        (["convert", str(checkpoint), never], "is a URT layer's checkpoint .* --backbone-set SET"),
        (
            ["convert", str(checkpoint), never, "--backbone-set", str(tmp_path / "two")],
            r"trained for 3 backbones of \d+ features, the set has 2",
        ),
        (
            ["convert", str(damaged), never, "--backbone-set", str(tmp_path / "set")],
            r"incomplete or inconsistent .*Missing key.*layers\.1\.linear_k\.bias",
        ),
        (
            ["convert", str(backbone), never, "--backbone-set", str(tmp_path / "set")],
            "expected URT's checkpoint.* converts without --backbone-set",
        ),
        (
            [
                "convert",
                str(checkpoint),
                never,
                "--backbone-set",
                str(tmp_path / "set"),
                "--temperature",
                "-1",
            ],
            "temperature must be a positive number",
        ),
        (["convert", str(backbone), never, "--temperature", "5"], "--temperature is for a URT checkpoint"),
        (
            [
                "convert",
                str(checkpoint),
                never,
                "--backbone-set",
                str(tmp_path / "set"),
                "--trained-on",
                "dtd",
            ],
            "--trained-on: for a backbone checkpoint",
        ),
    ]
    for command, message in cases:
        assert hf_copa.cli.main(command) == 2, command
        assert re.search(message, capsys.readouterr().err), (command, message)
    assert not (tmp_path / "never").exists()
