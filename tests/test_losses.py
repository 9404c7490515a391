"""The fast loss maths equals the plain formulation of the official code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_copa.losses import (
    class_means,
    cosine_scores,
    ncc_loss,
    one_hot_labels,
    symmetric_contrastive_loss,
    symmetric_contrastive_loss_and_grads,
)
from tests.support.official import symmetric_ce


def padded_batch(seed=0, dim=16):
    """Two episodes padded to a common size: (features, labels with -1, num_classes)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2, 2, -1, -1], [1, 0, 1, 0, 1, 0, 1, 1, 0]])
    features = torch.rand(2, labels.shape[1], dim, generator=g, dtype=torch.float64) + 0.1
    features[labels < 0] = 0
    return features, labels, 3


@pytest.mark.parametrize("tau", [2.0, 0.5])
def test_symmetric_loss_equals_official_n_by_n_form(tau):
    features, labels, num_classes = padded_batch()
    one_hot = one_hot_labels(labels, num_classes, features.dtype)
    protos = class_means(features, one_hot) @ torch.randn(16, 16, dtype=torch.float64)
    ours = symmetric_contrastive_loss(features, protos, one_hot, tau)
    for b in range(2):
        valid = labels[b] >= 0
        used = int(labels[b][valid].max()) + 1
        expected = symmetric_ce(features[b][valid], protos[b][:used], labels[b][valid], tau)
        assert ours[b].item() == pytest.approx(expected.item(), rel=1e-12)


def test_hand_derived_gradients_equal_autograd():
    features, labels, num_classes = padded_batch(seed=1)
    one_hot = one_hot_labels(labels, num_classes, features.dtype)
    prototypes = class_means(features, one_hot)
    g = torch.Generator().manual_seed(2)
    theta_i = torch.eye(16, dtype=torch.float64) + 0.1 * torch.randn(
        2, 16, 16, generator=g, dtype=torch.float64
    )
    theta_p = torch.eye(16, dtype=torch.float64) + 0.1 * torch.randn(
        2, 16, 16, generator=g, dtype=torch.float64
    )
    theta_i.requires_grad_(True)
    theta_p.requires_grad_(True)
    loss = symmetric_contrastive_loss(features @ theta_i.mT, prototypes @ theta_p.mT, one_hot, 2.0)
    loss.sum().backward()
    with torch.no_grad():
        fast_loss, grad_i, grad_p = symmetric_contrastive_loss_and_grads(
            features, prototypes, theta_i, theta_p, one_hot, 2.0
        )
    torch.testing.assert_close(fast_loss, loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_i, theta_i.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_p, theta_p.grad, rtol=1e-10, atol=1e-12)


def test_ncc_loss_equals_cross_entropy_on_present_classes():
    features, labels, num_classes = padded_batch(seed=3)
    one_hot = one_hot_labels(labels, num_classes, features.dtype)
    logits = cosine_scores(features, class_means(features, one_hot), 10.0)
    ours = ncc_loss(logits, one_hot)
    for b in range(2):
        valid = labels[b] >= 0
        used = int(labels[b][valid].max()) + 1
        expected = F.cross_entropy(logits[b][valid][:, :used], labels[b][valid])
        assert ours[b].item() == pytest.approx(expected.item(), rel=1e-12)


def test_zero_features_give_finite_scores_and_loss():
    features = torch.zeros(1, 4, 8)
    labels = torch.tensor([[0, 0, 1, 1]])
    one_hot = one_hot_labels(labels, 2, features.dtype)
    assert torch.isfinite(cosine_scores(features, class_means(features, one_hot), 10.0)).all()
    theta = torch.eye(8).expand(1, 8, 8)
    loss, grad_i, grad_p = symmetric_contrastive_loss_and_grads(
        features, class_means(features, one_hot), theta, theta, one_hot, 2.0
    )
    assert torch.isfinite(loss).all() and torch.isfinite(grad_i).all() and torch.isfinite(grad_p).all()
