"""Pure functions shared by the learners: prototypes, cosine scores and the two losses.

Every function is batched over episodes: features are [B, N, d] and labels are
[B, N] with -1 marking padding, so episodes of different sizes run together and
a single episode is just B = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # keeps all-zero features at cosine 0 instead of NaN


def one_hot_labels(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] labels (-1 = padding) -> [B, N, C] one-hot rows, all-zero for padding."""
    valid = labels >= 0
    one_hot = F.one_hot(labels.clamp(min=0), num_classes).to(dtype)
    return one_hot * valid.unsqueeze(-1).to(dtype)


def class_means(features: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """Per-class means [B, C, d]; a class with no example gets a zero prototype."""
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    return one_hot.transpose(1, 2) @ features / counts


def tf_l2_normalize(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """TensorFlow's `tf.nn.l2_normalize(x, axis=-1, epsilon=eps)`: x / sqrt(max(|x|^2, eps)) (the floor is on
    the squared norm, unlike `F.normalize`), as Meta-Dataset's classifiers use it with eps = 1e-3."""
    return x * torch.rsqrt(x.square().sum(dim=-1, keepdim=True).clamp_min(eps))


def cosine_scores(queries: torch.Tensor, prototypes: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * cosine(query, prototype): [B, Q, d] x [B, C, d] -> [B, Q, C]."""
    queries = F.normalize(queries, dim=-1, eps=NORM_EPS)
    prototypes = F.normalize(prototypes, dim=-1, eps=NORM_EPS)
    return scale * queries @ prototypes.transpose(1, 2)


def cosine_matrix(queries: torch.Tensor, prototypes: torch.Tensor, eps: float) -> torch.Tensor:
    """cos(q, p) for every pair, [Q, D] x [C, D] -> [Q, C], as `F.cosine_similarity(q[:, None], p[None],
    dim=-1, eps=eps)` (each norm floored at eps) computes it, without its [Q, C, D] intermediate."""
    q = queries / torch.linalg.vector_norm(queries, dim=-1, keepdim=True).clamp_min(eps)
    p = prototypes / torch.linalg.vector_norm(prototypes, dim=-1, keepdim=True).clamp_min(eps)
    return q @ p.T


BACKBONE_COMBINATIONS = ("concatenate", "sum")


def combine_backbones(features: torch.Tensor, weights: torch.Tensor, combination: str) -> torch.Tensor:
    """Several backbones' features [N, B, d] weighted by `weights` [B, H], as one vector per image.

    "concatenate" (SUR, dvornikita/SUR models/sur.py `apply_selection`, H = 1): each backbone's vector divided
    by its norm (no floor), times its weight, concatenated in SUR's order, `torch.stack(..., -1)` then
    reshape: element j of every backbone, then element j + 1 -> [N, d * B].
    "sum" (URT, liulu112601/URT fast-exps/lib/models/new_prop_prototype.py `apply_urt_avg_selection`): each
    vector `F.normalize`d, then per head h the weighted sum over backbones, heads side by side -> [N, H * d].
    """
    if combination == "concatenate":
        unit = features / features.square().sum(-1, keepdim=True).sqrt()
        return (unit.transpose(1, 2) * weights[:, 0]).reshape(len(features), -1)
    if combination == "sum":
        unit = F.normalize(features, dim=-1)
        heads = [(weights[:, h].view(1, -1, 1) * unit).sum(dim=1) for h in range(weights.shape[1])]
        return torch.stack(heads, dim=1).reshape(len(features), -1)
    raise ValueError(f"combination must be one of {BACKBONE_COMBINATIONS}, got {combination!r}")


def combined_prototypes(
    features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, combination: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(combined features, their class means) of one support set [N, B, d] with labels 0..C-1."""
    combined = combine_backbones(features, weights, combination)
    one_hot = one_hot_labels(labels.unsqueeze(0), int(labels.max()) + 1, combined.dtype)
    return combined, class_means(combined.unsqueeze(0), one_hot)[0]


def ncc_loss(logits: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per episode [B] of [B, N, C] logits; absent classes and padded rows ignored."""
    return summed_cross_entropy(logits, one_hot) / one_hot.sum(dim=(1, 2))


def summed_cross_entropy(logits: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over each episode's rows [B] of [B, N, C] logits; absent classes (padding) and
    padded rows ignored. (Meta-Dataset's fine-tuning minimises this sum: its loss is a per-example vector.)"""
    present = one_hot.sum(dim=1, keepdim=True) > 0
    log_probs = torch.log_softmax(logits.masked_fill(~present, float("-inf")), dim=-1)
    return -(log_probs.masked_fill(~present, 0.0) * one_hot).sum(dim=(1, 2))


def symmetric_contrastive_loss(
    image_embeddings: torch.Tensor, prototype_embeddings: torch.Tensor, one_hot: torch.Tensor, tau: float
) -> torch.Tensor:
    """CoPA's symmetric (CLIP-like) loss per episode [B].

    The official code builds an N x N matrix whose column j is the prototype of
    sample j's class, so it has only C distinct columns. With S = e^tau z_I z_P^T
    ([N, C]) and class counts n_c, its two cross-entropies are exactly
      rows:    mean_i [logsumexp_c (S_ic + log n_c) - S_{i,y_i}]
      columns: (1/N) sum_c n_c logsumexp_i S_ic - mean_i S_{i,y_i}
    which costs N*C*d instead of N*N*d. The log-sum-exps run in float64: the
    loss falls to ~1e-3 and float32 would lose its last digits to cancellation.
    """
    z_images = F.normalize(image_embeddings, dim=-1, eps=NORM_EPS)
    z_prototypes = F.normalize(prototype_embeddings, dim=-1, eps=NORM_EPS)
    logit_scale = torch.exp(torch.tensor(tau, dtype=z_images.dtype))
    precise = _precise_dtype(z_images)
    scores = (logit_scale * z_images @ z_prototypes.transpose(1, 2)).to(precise)
    one_hot = one_hot.to(precise)

    counts = one_hot.sum(dim=1)  # [B, C]
    valid_rows = one_hot.sum(dim=-1) > 0  # [B, N]
    num_rows = valid_rows.sum(dim=1).to(scores.dtype)
    positive = (scores * one_hot).sum(dim=(1, 2))  # sum_i S_{i, y_i}

    row_lse = torch.logsumexp(
        scores + torch.log(counts).unsqueeze(1), dim=-1
    )  # log 0 = -inf drops absent classes
    row_term = (row_lse * valid_rows).sum(dim=1)
    col_lse = torch.logsumexp(scores.masked_fill(~valid_rows.unsqueeze(-1), float("-inf")), dim=1)
    col_term = (counts * col_lse.masked_fill(counts == 0, 0.0)).sum(dim=1)
    loss = 0.5 * (row_term + col_term - 2 * positive) / num_rows
    return loss.to(image_embeddings.dtype)


def _precise_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 where the device has it (not MPS), for small reductions that need the digits."""
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def symmetric_contrastive_loss_and_grads(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    theta_image: torch.Tensor,
    theta_prototype: torch.Tensor,
    one_hot: torch.Tensor,
    tau: float,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`symmetric_contrastive_loss(features @ theta_image^T, prototypes @ theta_prototype^T)` and its
    gradients with respect to both heads, derived by hand.

    CoPA's inner loop is two [N, d] x [d, d] products a step; autograd roughly
    doubles that with elementwise passes and temporaries, so the learner uses
    this instead (tests check it against autograd of the function above). It
    stays in the features' dtype like the official code: near convergence
    dL/dS is a cancellation (softmax - one-hot) that Adam rescales, so the
    trajectory follows the official float32 one only if the rounding does.
    Each cross-entropy is shifted by its own maximum before the log-sum-exp, as
    `log_softmax` does, so the loss keeps its digits when it gets small.
    Returns (loss [B], grad_theta_image [B, d, d], grad_theta_prototype [B, d, d]); the gradients
    are written into `out` when given (saves a copy into the optimiser's `.grad` each step).
    """
    u = features @ theta_image.mT  # [B, N, d]: one of the two big products
    v = prototypes @ theta_prototype.mT  # [B, C, d]
    u_norm = u.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    v_norm = v.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    z_prototypes = v / v_norm
    logit_scale = float(torch.exp(torch.tensor(tau, dtype=u.dtype)))
    scores = logit_scale * (u @ z_prototypes.transpose(1, 2)) / u_norm  # [B, N, C], z_I never formed

    counts = one_hot.sum(dim=1, keepdim=True)  # [B, 1, C]
    valid_rows = one_hot.sum(dim=-1, keepdim=True)  # [B, N, 1], 1 or 0
    num_rows = valid_rows.sum(dim=(1, 2))
    positive = (scores * one_hot).sum(dim=-1, keepdim=True)  # S_{i, y_i}

    # Rows: softmax over the N columns, n_c of which equal S_ic.
    row_logits = scores + torch.log(counts)
    row_max = row_logits.amax(dim=-1, keepdim=True)
    row_exp = torch.exp(row_logits - row_max)
    row_sum = row_exp.sum(dim=-1, keepdim=True)
    row_ce = (row_max - positive) + torch.log(row_sum)
    # Columns: softmax of column c over the valid images.
    col_logits = scores.masked_fill(valid_rows == 0, float("-inf"))
    col_max = col_logits.amax(dim=1, keepdim=True).masked_fill(counts == 0, 0.0)
    col_exp = torch.exp(col_logits - col_max)
    col_sum = col_exp.sum(dim=1, keepdim=True).masked_fill(counts == 0, 1.0)
    col_ce = ((col_max + torch.log(col_sum)) * one_hot).sum(dim=-1, keepdim=True) - positive
    loss = 0.5 * ((row_ce + col_ce) * valid_rows).sum(dim=(1, 2)) / num_rows

    # dL/dS = (softmax over classes + n_c * softmax over images - 2 * one_hot) / (2N)
    grad_scores = valid_rows * row_exp / row_sum + counts * col_exp / col_sum - 2 * one_hot
    grad_scores = grad_scores * (0.5 / num_rows).view(-1, 1, 1)
    # Through the normalisations: dL/du = (dL/dz - z (z . dL/dz)) / |u| with z . dL/dz = sum_c G_ic S_ic.
    weighted = grad_scores * scores
    image_radial = weighted.sum(dim=-1, keepdim=True)  # [B, N, 1]
    proto_radial = weighted.sum(dim=1).unsqueeze(-1)  # [B, C, 1]
    grad_scores_scaled = (logit_scale * grad_scores) / u_norm
    grad_u = torch.baddbmm(u * (-image_radial / u_norm.square()), grad_scores_scaled, z_prototypes)
    grad_z_prototypes = grad_scores_scaled.transpose(1, 2) @ u
    grad_v = (grad_z_prototypes - z_prototypes * proto_radial) / v_norm
    grad_image, grad_prototype = out if out is not None else (None, None)
    grad_image = torch.matmul(grad_u.mT, features, out=grad_image)
    grad_prototype = torch.matmul(grad_v.mT, prototypes, out=grad_prototype)
    return loss, grad_image, grad_prototype
