"""The learners and the backbone reproduce the authors' official outputs (../shared/reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hf_copa
from hf_copa.conversion import load_url_backbone
from tests.support.official import official_url

EPISODES = range(6)
COPA_SETTINGS = {"default": None, "highlr": "high-lr"}
# URL at lr 1.0 on the two largest episodes is chaotic: a 6e-8 relative perturbation of the
# support features (float32 round-off) moves the final logits by up to 7 in float64, and the
# official code itself, re-run line for line on this torch, misses these two references by
# 0.096 and 8.8. No float32 implementation can match them to 1e-3; they are checked against an
# independent float64 implementation of the official algorithm instead.
URL_CHAOTIC = {(4, "unseen"), (5, "unseen")}


@pytest.fixture(scope="module")
def copa_reference(reference_dir):
    return np.load(reference_dir / "copa_adaptation.npz")


@pytest.fixture(scope="module")
def url_reference(reference_dir):
    return np.load(reference_dir / "url_pa_adaptation.npz")


def episode(ref, i):
    return [torch.from_numpy(ref[f"ep{i}_{key}"]) for key in ("support", "support_labels", "query")]


@pytest.mark.parametrize("setting", COPA_SETTINGS)
@pytest.mark.parametrize("i", EPISODES)
def test_copa_matches_official(copa_reference, i, setting):
    support, labels, query = episode(copa_reference, i)
    head = hf_copa.adapt(support, labels, method="copa", preset=COPA_SETTINGS[setting])
    ref_losses = copa_reference[f"ep{i}_copa_{setting}_train_losses"]
    np.testing.assert_allclose(head.train_losses, ref_losses, rtol=1e-4, atol=0)
    ref_logits = copa_reference[f"ep{i}_copa_{setting}_query_logits"]
    np.testing.assert_allclose(head.logits(query).numpy(), ref_logits, rtol=0, atol=1e-3)
    query_labels = copa_reference[f"ep{i}_query_labels"]
    accuracy = (head.logits(query).argmax(1).numpy() == query_labels).mean()
    assert accuracy == pytest.approx(float(copa_reference[f"ep{i}_copa_{setting}_query_acc"]), abs=1e-6)


@pytest.mark.parametrize("setting", ["seen", "unseen"])
@pytest.mark.parametrize("i", EPISODES)
def test_url_matches_official(url_reference, i, setting):
    support, labels, query = episode(url_reference, i)
    if (i, setting) in URL_CHAOTIC:
        pytest.skip("chaotic at float32 round-off; see test_url_chaotic_cases_match_float64_official")
    head = hf_copa.adapt(support, labels, method="url", preset=setting)
    ref_logits = url_reference[f"ep{i}_url_{setting}_query_logits"]
    np.testing.assert_allclose(head.logits(query).numpy(), ref_logits, rtol=0, atol=1e-3)


@pytest.mark.parametrize("i", [4, 5])
def test_url_chaotic_cases_match_float64_official(url_reference, i):
    support, labels, query = episode(url_reference, i)
    expected = official_url(support.double(), labels, query.double(), lr=1.0)
    head = hf_copa.adapt(support.double(), labels, method="url", preset="unseen")
    np.testing.assert_allclose(head.logits(query.double()).numpy(), expected.numpy(), rtol=0, atol=1e-3)


def test_backbone_matches_official_embeddings(reference_dir):
    model = load_url_backbone(reference_dir / "url_checkpoint.pth.tar.xz", stem_padding=2)
    reference = np.load(reference_dir / "url_backbone_embeddings.npz")
    processor = model.default_image_processor()
    pixel_values = processor(list(reference["images_uint8"]))["pixel_values"]
    expected_input = 2 * (torch.from_numpy(reference["images_uint8"]).permute(0, 3, 1, 2).float() / 255 - 0.5)
    torch.testing.assert_close(pixel_values, expected_input, rtol=0, atol=1e-6)
    features = model.extract_features(pixel_values)
    np.testing.assert_allclose(features.numpy(), reference["embeddings"], rtol=0, atol=1e-4)
