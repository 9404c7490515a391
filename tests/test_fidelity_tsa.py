"""TSA and CoPA+TSA against the authors' official outputs (../shared/reference) and their official algorithm.

What float32 can show, and what it cannot: in these loops round-off is amplified. Float32 runs of the
*same* algorithm that differ only in round-off (thread count, 1-ulp input changes, the official loop's
structure) end up to 0.039 apart in TSA's seen-domain logits, 0.012 in CoPA+TSA's default-setting logits,
and 1 to 7 logit units apart in the high-learning-rate settings (`scripts/tsa_fidelity_study.py` measures
this; the README has its table). No float32 implementation can be held to 1e-3 there. So:

- the float32 learners are held to the reference where the reference is reproducible at all: CoPA+TSA's
  per-step losses at its default setting (1e-4 relative), the first losses of every setting (before
  round-off has grown), and the logits of the settings that stay within round-off spread, at a bound
  just above that measured spread;
- the algorithm itself is checked in float64, where round-off cannot steer trajectories apart: the
  learners must equal `tests.support.official`, a plain transcription of the official loops
  (adapter modules in a deep copy, 1x1-convolution heads, N x N contrastive logits, the official
  optimiser groups), to 1e-6 over all 40 steps of every setting.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_copa import CopaConfig, CopaModel, get_learner
from hf_copa.conversion import convert_url_checkpoint
from tests.support.official import official_copa_tsa, official_tsa

EPISODES = (0, 1)
TSA_SETTINGS = {"seen": (0.05, 0.1), "unseen": (0.5, 1.0)}  # lr, lr_beta
COPA_TSA_SETTINGS = {"default": ("default", 1e-3, 0.1, 0.1), "highlr": ("high-lr", 5e-3, 0.5, 0.0)}
# Bounds on |logits - reference| for the settings whose round-off spread stays small: twice the largest
# spread measured between round-off-perturbed float32 runs of these episodes (0.039 and 0.0121;
# hf_copa's own float32 runs are 0.022 / 0.012 and 0.0013 / 0.0052 from the reference).
TSA_SEEN_BOUND = 0.08
COPA_TSA_DEFAULT_BOUND = 0.025


@pytest.fixture(scope="module")
def reference_backbone(reference_dir, tmp_path_factory) -> CopaModel:
    """The reference checkpoint as `hf-copa convert` converts it by default: stem padding 1, as URL's
    models/resnet18.py, which every official test script (and these references) used."""
    folder = convert_url_checkpoint(
        reference_dir / "url_checkpoint.pth.tar.xz", tmp_path_factory.mktemp("converted") / "copa-url"
    )
    return CopaModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def tsa_reference(reference_dir):
    return np.load(reference_dir / "tsa_adaptation.npz")


@pytest.fixture(scope="module")
def copa_tsa_reference(reference_dir):
    return np.load(reference_dir / "copa_tsa_adaptation.npz")


def episode(reference, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(support, labels, query) with the network input 2 * (x / 255 - 0.5), NCHW."""

    def pixels(key: str) -> torch.Tensor:
        return 2 * (torch.from_numpy(reference[f"ep{i}_{key}_uint8"]).permute(0, 3, 1, 2).float() / 255 - 0.5)

    return pixels("support"), torch.from_numpy(reference[f"ep{i}_support_labels"]), pixels("query")


def adapt(model: CopaModel, method: str, support, labels, query, **hyperparameters):
    head = get_learner(method, **hyperparameters).fit_images(model, support, labels)
    return head, head.logits(model.extract_features(query, adapters=head.adapters))


# --- float32, against the official outputs ---------------------------------------------------------------


@pytest.mark.parametrize("i", EPISODES)
def test_copa_tsa_default_losses_and_logits_match_official(reference_backbone, copa_tsa_reference, i):
    support, labels, query = episode(copa_tsa_reference, i)
    head, logits = adapt(reference_backbone, "copa+tsa", support, labels, query, preset="default")
    expected_losses = copa_tsa_reference[f"ep{i}_copa_tsa_default_train_losses"]
    np.testing.assert_allclose(head.train_losses, expected_losses, rtol=1e-4, atol=0)
    expected = copa_tsa_reference[f"ep{i}_copa_tsa_default_query_logits"]
    np.testing.assert_allclose(logits.numpy(), expected, rtol=0, atol=COPA_TSA_DEFAULT_BOUND)


@pytest.mark.parametrize("i", EPISODES)
def test_tsa_seen_logits_match_official_within_round_off(reference_backbone, tsa_reference, i):
    support, labels, query = episode(tsa_reference, i)
    _, logits = adapt(reference_backbone, "tsa", support, labels, query, preset="seen")
    expected = tsa_reference[f"ep{i}_tsa_seen_query_logits"]
    np.testing.assert_allclose(logits.numpy(), expected, rtol=0, atol=TSA_SEEN_BOUND)


@pytest.mark.parametrize("setting", COPA_TSA_SETTINGS)
@pytest.mark.parametrize("i", EPISODES)
def test_copa_tsa_first_losses_match_official_in_every_setting(
    reference_backbone, copa_tsa_reference, i, setting
):
    """Before round-off has grown, even the chaotic high-lr runs agree: the loss at the start and after
    one step (which exercises the adapters' and heads' learning rates and weight decay)."""
    support, labels, query = episode(copa_tsa_reference, i)
    preset = COPA_TSA_SETTINGS[setting][0]
    head = get_learner("copa+tsa", preset, steps=2).fit_images(reference_backbone, support, labels)
    expected = copa_tsa_reference[f"ep{i}_copa_tsa_{setting}_train_losses"][:2]
    np.testing.assert_allclose(head.train_losses, expected, rtol=1e-6, atol=0)


# --- float64, against a transcription of the official loops ----------------------------------------------


@pytest.fixture(scope="module")
def small_float64_backbone() -> CopaModel:
    """A small float64 backbone with non-trivial BatchNorm statistics: the algorithm, not the weights,
    is what this part checks, and float64 on the full ResNet-18 would take minutes."""
    torch.manual_seed(0)
    config = CopaConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], image_size=32, stem_padding=1)
    model = CopaModel(config).double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model


def float64_episode(seed: int, shots: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(shots)])
    patterns = torch.rand(len(shots), 3, 32, 32, generator=generator, dtype=torch.float64) * 2 - 1
    support = (patterns[labels] + 0.3 * torch.randn(len(labels), 3, 32, 32, generator=generator)).clamp(-1, 1)
    query = patterns.repeat(2, 1, 1, 1) + 0.3 * torch.randn(2 * len(shots), 3, 32, 32, generator=generator)
    return support, labels, query.clamp(-1, 1)


FLOAT64_EPISODES = {"5-way 2-shot": (0, [2] * 5), "3-way 1/3/5-shot": (1, [1, 3, 5])}


@pytest.mark.parametrize("setting", TSA_SETTINGS)
@pytest.mark.parametrize("shape", FLOAT64_EPISODES)
def test_tsa_equals_the_official_loop_in_float64(small_float64_backbone, shape, setting):
    support, labels, query = float64_episode(*FLOAT64_EPISODES[shape])
    lr, lr_beta = TSA_SETTINGS[setting]
    expected = official_tsa(small_float64_backbone, support, labels, query, lr, lr_beta)
    _, logits = adapt(small_float64_backbone, "tsa", support, labels, query, preset=setting)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    _, unadapted = adapt(small_float64_backbone, "tsa", support, labels, query, steps=0)
    assert (logits - unadapted).abs().max() > 0.1  # the loop really moved the logits


@pytest.mark.parametrize("setting", COPA_TSA_SETTINGS)
@pytest.mark.parametrize("shape", FLOAT64_EPISODES)
def test_copa_tsa_equals_the_official_loop_in_float64(small_float64_backbone, shape, setting):
    support, labels, query = float64_episode(*FLOAT64_EPISODES[shape])
    preset, lr, adapter_lr_scale, weight_decay = COPA_TSA_SETTINGS[setting]
    expected_losses, expected = official_copa_tsa(
        small_float64_backbone, support, labels, query, lr, adapter_lr_scale, weight_decay
    )
    head, logits = adapt(small_float64_backbone, "copa+tsa", support, labels, query, preset=preset)
    np.testing.assert_allclose(head.train_losses, expected_losses, rtol=1e-9, atol=0)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert expected_losses[-1] < 0.9 * expected_losses[0]  # the loop really learned something
