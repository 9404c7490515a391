"""Plain transcriptions of the official CoPA, TSA and CoPA+TSA loops: oracles for fidelity checks, and the
speed baseline of `scripts/benchmark_adaptation.py`.

They follow the official code's structure rather than hf_copa's (see ../shared/reference/README.md):
adapters are modules that replace the convolutions of a deep copy of the backbone, the heads are 1x1
convolutions, prototypes are per-class means, CoPA's loss builds the full N x N logit matrix, and the
optimisers get the official parameter groups. They run in the backbone's dtype; tests run both these
and the learners in float64, where round-off cannot steer the trajectories apart.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

COSINE_EPS = 1e-30  # the official scoring uses F.cosine_similarity(..., eps=1e-30)


class ResidualAdapterConv(nn.Module):
    """A frozen convolution plus its residual adapter alpha (1x1, same stride), alpha = 1e-4 * I."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        out_channels, in_channels = conv.weight.shape[:2]
        eye = torch.eye(out_channels, in_channels, dtype=conv.weight.dtype, device=conv.weight.device)
        self.alpha = nn.Parameter(1e-4 * eye[:, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + F.conv2d(x, self.alpha, stride=self.conv.stride)


def with_adapters(backbone: nn.Module, stages: list[str]) -> nn.Module:
    """A frozen eval-mode deep copy of `backbone` whose 3x3 block convolutions in `stages` carry adapters."""
    model = copy.deepcopy(backbone).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for stage in stages:
        for block in getattr(model, stage):
            for name in ("conv1", "conv2"):
                setattr(block, name, ResidualAdapterConv(getattr(block, name)))
    return model


def feature_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The official `embed(x, is_pooling=False)`: stem, then the four stages."""
    x = model.relu(model.bn1(model.conv1(images)))
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, stage)(x)
    return x


def class_means(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class means, class by class (URL's `compute_prototypes`)."""
    return torch.stack([features[labels == c].mean(0) for c in range(int(labels.max()) + 1)])


def cosine_logits(queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    return 10 * F.cosine_similarity(queries.unsqueeze(1), prototypes.unsqueeze(0), dim=-1, eps=COSINE_EPS)


def head(features: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """A d x d head as the official 1x1 convolution of [N, d] features."""
    return F.conv2d(features[:, :, None, None], kernel).flatten(1)


def official_url(
    support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, lr: float, steps: int = 40
) -> torch.Tensor:
    """URL's `pa` on features: one d x d map (identity init), Adadelta on the support set's cosine-NCC loss
    against its own class means; returns the query logits [Q, C]. Runs in the features' dtype."""
    theta = torch.eye(support.shape[1], dtype=support.dtype, requires_grad=True)
    optimizer = torch.optim.Adadelta([theta], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        transformed = support @ theta.T
        F.cross_entropy(cosine_logits(transformed, class_means(transformed, labels)), labels).backward()
        optimizer.step()
    with torch.no_grad():
        return cosine_logits(query @ theta.T, class_means(support @ theta.T, labels))


def official_tsa(
    backbone: nn.Module,
    support: torch.Tensor,
    labels: torch.Tensor,
    query: torch.Tensor,
    lr: float,
    lr_beta: float,
    steps: int = 40,
) -> torch.Tensor:
    """URL's `tsa` (alpha+beta, residual, matrix, eye init): returns the query logits [Q, C]."""
    model = with_adapters(backbone, ["layer1", "layer2", "layer3", "layer4"])
    dim = model.layer4[-1].bn2.num_features
    beta = torch.eye(dim, dtype=support.dtype)[:, :, None, None].requires_grad_(True)
    alphas = [p for name, p in model.named_parameters() if "alpha" in name]
    optimizer = torch.optim.Adadelta([{"params": alphas}, {"params": [beta], "lr": lr_beta}], lr=lr)

    def embed(images: torch.Tensor) -> torch.Tensor:
        return head(F.adaptive_avg_pool2d(feature_maps(model, images), 1).flatten(1), beta)

    for _ in range(steps):
        optimizer.zero_grad()
        aligned = embed(support)
        F.cross_entropy(cosine_logits(aligned, class_means(aligned, labels)), labels).backward()
        optimizer.step()
    with torch.no_grad():
        return cosine_logits(embed(query), class_means(embed(support), labels))


def symmetric_ce(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, tau: float):
    """CoPA's `symmetric_CE` on the N x N matrix whose column j is the prototype of sample j's class."""
    embeddings = embeddings / embeddings.norm(dim=1, keepdim=True)
    prototypes = prototypes / prototypes.norm(dim=1, keepdim=True)
    expanded = F.one_hot(labels).to(prototypes.dtype) @ prototypes
    logits = torch.exp(torch.tensor(tau, dtype=embeddings.dtype)) * embeddings @ expanded.t()
    targets = torch.arange(len(labels))
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def official_copa_tsa(
    backbone: nn.Module,
    support: torch.Tensor,
    labels: torch.Tensor,
    query: torch.Tensor,
    lr: float,
    adapter_lr_scale: float,
    weight_decay: float,
    tau: float = 2.0,
    steps: int = 40,
) -> tuple[np.ndarray, torch.Tensor]:
    """CoPA's `tsa_adaptation` (adapters in stages 2 and 3, linear heads): (losses [steps], query logits)."""
    model = with_adapters(backbone, ["layer2", "layer3"])
    dim = model.layer4[-1].bn2.num_features
    theta_image = torch.eye(dim, dtype=support.dtype)[:, :, None, None].requires_grad_(True)
    theta_proto = torch.eye(dim, dtype=support.dtype)[:, :, None, None].requires_grad_(True)
    alphas = [p for name, p in model.named_parameters() if "alpha" in name]
    optimizer = torch.optim.Adam(
        [
            {"params": alphas, "lr": lr * adapter_lr_scale},
            {"params": [theta_image]},
            {"params": [theta_proto]},
        ],
        lr=lr,
        weight_decay=weight_decay,
    )

    def features_and_prototypes(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = feature_maps(model, images)
        prototype_maps = class_means(maps, labels)  # means of the maps, pooled afterwards
        return F.adaptive_avg_pool2d(maps, 1).flatten(1), F.adaptive_avg_pool2d(prototype_maps, 1).flatten(1)

    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        features, prototypes = features_and_prototypes(support)
        loss = symmetric_ce(head(features, theta_image), head(prototypes, theta_proto), labels, tau)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, prototypes = features_and_prototypes(support)
        queries = F.adaptive_avg_pool2d(feature_maps(model, query), 1).flatten(1)
        return np.array(losses), cosine_logits(head(queries, theta_image), head(prototypes, theta_proto))


def official_copa(
    support: torch.Tensor,
    support_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    lr: float,
    weight_decay: float,
    tau: float = 2.0,
    steps: int = 50,
) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """CoPA's `pa_adaptation` (linear heads) on features, shaped like the official code: 1x1-convolution
    heads, the N x N loss by autograd, two Adam groups, and the query set scored (loss and accuracy read back
    with `.item()`) before every step and after the last. Returns (query logits [Q, C], history)."""
    dim = support.shape[1]
    theta_image = torch.eye(dim, dtype=support.dtype)[:, :, None, None].requires_grad_(True)
    theta_proto = torch.eye(dim, dtype=support.dtype)[:, :, None, None].requires_grad_(True)
    optimizer = torch.optim.Adam(
        [{"params": [theta_image]}, {"params": [theta_proto]}], lr=lr, weight_decay=weight_decay
    )
    prototypes = class_means(support, support_labels)
    history: dict[str, list[float]] = {"train_losses": [], "train_accs": [], "val_losses": [], "val_accs": []}

    def record(
        kind: str, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        projected = head(prototypes, theta_proto)
        loss = symmetric_ce(embeddings, projected, labels, tau)
        logits = cosine_logits(embeddings, projected)
        history[f"{kind}_losses"].append(loss.item())
        history[f"{kind}_accs"].append((logits.argmax(1) == labels).float().mean().item())
        return loss, logits

    def score_query() -> torch.Tensor:
        with torch.no_grad():
            return record("val", head(query, theta_image), query_labels)[1]

    for _ in range(steps):
        score_query()
        optimizer.zero_grad()
        loss, _ = record("train", head(support, theta_image), support_labels)
        loss.backward()
        optimizer.step()
    return score_query(), history


# --- Meta-Dataset: the Finetune baseline and fo-Proto-MAML (google-research/meta-dataset, commit 16760950)


def tf_l2_normalize(x: torch.Tensor, axis: int, epsilon: float = 1e-3) -> torch.Tensor:
    """`tf.nn.l2_normalize`: x * rsqrt(max(sum(x^2), epsilon))."""
    return x * torch.rsqrt(torch.clamp((x * x).sum(axis, keepdim=True), min=epsilon))


class TFAdamSlots:
    """The state and update of `tf.compat.v1.train.AdamOptimizer` (`ApplyAdam`'s kernel, as written in
    tensorflow/core/kernels/training_ops.cc): m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2);
    var -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)."""

    def __init__(self, variables, lr, beta1=0.9, beta2=0.999, epsilon=1e-8):
        self.lr, self.beta1, self.beta2, self.epsilon = lr, beta1, beta2, epsilon
        self.m = [torch.zeros_like(v) for v in variables]
        self.v = [torch.zeros_like(v) for v in variables]
        self.beta1_power, self.beta2_power = 1.0, 1.0

    @torch.no_grad()
    def apply(self, variables, grads) -> None:
        self.beta1_power *= self.beta1
        self.beta2_power *= self.beta2
        lr_t = self.lr * (1 - self.beta2_power) ** 0.5 / (1 - self.beta1_power)
        for var, grad, m, v in zip(variables, grads, self.m, self.v, strict=True):
            m += (grad - m) * (1 - self.beta1)
            v += (grad * grad - v) * (1 - self.beta2)
            var -= lr_t * m / (v.sqrt() + self.epsilon)


def official_finetune(
    support: torch.Tensor,
    labels: torch.Tensor,
    query: torch.Tensor,
    w_init: torch.Tensor,
    steps: int,
    lr: float,
    adam: bool = True,
    weight_norm: bool = True,
    cosine: bool = False,
    multiplier: float = 1.0,
    backbone: nn.Module | None = None,
) -> torch.Tensor:
    """`BaselineFinetuneLearner.compute_logits` (learners/optimization_learners.py l. 186-375) with
    `functional_classifiers.linear_classifier` (l. 66-156): a classifier over the episode's `way` classes,
    w_fc [d, way] from `w_init` (already scaled by its init std), g = 1 and b_fc = 0 under weight norm (the
    data-dependent init does not rerun after the first episode), b_fc = 0.1 without; `steps` updates of
    Adam (`finetune_with_adam`) or gradient descent on the per-example cross-entropy vector (whose gradient
    tf.gradients sums). With `backbone` (`finetune_all_layers=True`), `support` / `query` are images and
    every variable of an eval-mode copy of the backbone is fine-tuned too. Returns the query logits."""
    way = int(labels.max()) + 1
    onehot = F.one_hot(labels, way).to(w_init.dtype)
    w_fc = w_init.clone().requires_grad_(True)
    fc_vars = [w_fc]
    g = b_fc = None
    if weight_norm:
        g = torch.ones(way, dtype=w_init.dtype).requires_grad_(True)
        fc_vars.append(g)
    if not cosine:
        b_fc = torch.full((way,), 0.0 if weight_norm else 0.1, dtype=w_init.dtype).requires_grad_(True)
        fc_vars.append(b_fc)
    model = None
    variables = list(fc_vars)
    if backbone is not None:
        model = copy.deepcopy(backbone).eval()  # get_embeddings_vars_copy_ops: per-episode copies
        variables += list(model.parameters())

    def embed(x: torch.Tensor) -> torch.Tensor:
        return x if model is None else model(x).pooler_output

    def fc_layer(embeddings: torch.Tensor) -> torch.Tensor:
        w = w_fc
        if weight_norm:
            w = w * g / torch.sqrt(torch.sum(torch.square(w), 0))
        if cosine:
            embeddings = tf_l2_normalize(embeddings, 1)
            if not weight_norm:
                w = tf_l2_normalize(w, 0)
            return multiplier * (embeddings @ w)
        return embeddings @ w + b_fc

    adam_slots = TFAdamSlots(variables, lr) if adam else None
    for _ in range(steps):
        logits = fc_layer(embed(support))[:, :way]
        loss = -(onehot * F.log_softmax(logits, dim=1)).sum(1)  # softmax_cross_entropy, Reduction.NONE
        grads = torch.autograd.grad(loss.sum(), variables)
        if adam_slots is not None:
            adam_slots.apply(variables, grads)
        else:
            with torch.no_grad():
                for var, grad in zip(variables, grads, strict=True):
                    var -= lr * grad
    with torch.no_grad():
        return fc_layer(embed(query))[:, :way]


def official_proto_maml(
    support: torch.Tensor,
    labels: torch.Tensor,
    query: torch.Tensor,
    alpha: float,
    steps: int,
    backbone: nn.Module | None = None,
) -> torch.Tensor:
    """`MAMLLearner.forward_pass` at test time (learners/optimization_learners.py l. 469-623) with
    `proto_maml_fc_layer_init`: fc weights 2 * prototypes^T [d, way] and bias -|prototype|^2, then `steps`
    plain gradient-descent updates (`gradient_descent_step`, alpha) on `tf.losses.softmax_cross_entropy` of
    the support set (the mean). With `backbone`, `support` / `query` are images and the inner loop also
    updates an eval-mode copy's variables, except BatchNorm's scale and offset (`adapt_batch_norm=False`).
    Returns the query logits."""
    way = int(labels.max()) + 1
    onehot = F.one_hot(labels, way)
    model = None
    embedding_vars = []
    if backbone is not None:
        model = copy.deepcopy(backbone).eval()
        batch_norm = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
        embedding_vars = [p for p in model.parameters() if id(p) not in batch_norm]
        for p in model.parameters():
            p.requires_grad_(id(p) not in batch_norm)

    def embed(x: torch.Tensor) -> torch.Tensor:
        return x if model is None else model(x).pooler_output

    with torch.no_grad():
        embeddings = embed(support)
        prototypes = (onehot.T.to(embeddings.dtype) @ embeddings) / onehot.sum(0, keepdim=True).T
        fc_weights = (2 * prototypes).T.clone().requires_grad_(True)
        fc_bias = (-torch.square(torch.norm(prototypes, dim=1))).clone().requires_grad_(True)
    variables = [*embedding_vars, fc_weights, fc_bias]
    for _ in range(steps):
        logits = (embed(support) @ fc_weights + fc_bias)[:, :way]
        loss = -(onehot.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(1).mean()
        grads = torch.autograd.grad(loss, variables)
        with torch.no_grad():
            for var, grad in zip(variables, grads, strict=True):
                var -= alpha * grad
    with torch.no_grad():
        return (embed(query) @ fc_weights + fc_bias)[:, :way]


# --- Simple CNAPS' classifier (peymanbateni/simple-cnaps, commit 5c43a08b) ---------------------------------


def official_estimate_cov(examples: torch.Tensor, rowvar: bool = False) -> torch.Tensor:
    """`SimpleCnaps.estimate_cov` (simple-cnaps-src/simple_cnaps.py l. 161-197), step for step."""
    if examples.dim() > 2:
        raise ValueError("m has more than 2 dimensions")
    if examples.dim() < 2:
        examples = examples.view(1, -1)
    if not rowvar and examples.size(0) != 1:
        examples = examples.t()
    factor = 1.0 / (examples.size(1) - 1)
    examples = examples - torch.mean(examples, dim=1, keepdim=True)
    examples_t = examples.t()
    return factor * examples.matmul(examples_t).squeeze()


def official_mahalanobis(support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """`SimpleCnaps._build_class_reps_and_covariance_estimates` (l. 132-159) and the logits of `forward`
    (l. 82-87) on given features: the query logits [Q, C]."""
    task_covariance_estimate = official_estimate_cov(support)
    class_representations, class_precision_matrices = [], []
    for c in torch.unique(labels):
        class_features = torch.index_select(support, 0, torch.nonzero(torch.eq(labels, c)).flatten())
        class_representations.append(torch.mean(class_features, dim=0, keepdim=True))
        lambda_k_tau = class_features.size(0) / (class_features.size(0) + 1)
        eye = torch.eye(class_features.size(1), class_features.size(1), dtype=support.dtype)
        class_precision_matrices.append(
            torch.inverse(
                (lambda_k_tau * official_estimate_cov(class_features))
                + ((1 - lambda_k_tau) * task_covariance_estimate)
                + eye
            )
        )
    class_means = torch.stack(class_representations).squeeze(1)
    precisions = torch.stack(class_precision_matrices)
    number_of_classes, number_of_targets = class_means.size(0), query.size(0)
    repeated_target = query.repeat(1, number_of_classes).view(-1, class_means.size(1))
    repeated_class_means = class_means.repeat(number_of_targets, 1)
    repeated_difference = repeated_class_means - repeated_target
    repeated_difference = repeated_difference.view(
        number_of_targets, number_of_classes, repeated_difference.size(1)
    ).permute(1, 0, 2)
    first_half = torch.matmul(repeated_difference, precisions)
    return torch.mul(first_half, repeated_difference).sum(dim=2).transpose(1, 0) * -1


# --- CoPA's transformer encoders (HongduanTian/CoPA, commit f829b529) ------------------------------------


class OfficialAttention(nn.Module):
    """`models/transformer.py::AttentionModule` (l. 15-138) with `init_mode='eye'`."""

    def __init__(self, num_heads: int, dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_head, self.k_head, self.v_head = (nn.Linear(dim, dim) for _ in range(3))
        with torch.no_grad():
            for layer in (self.q_head, self.k_head, self.v_head):
                layer.weight.copy_(torch.eye(dim))
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def split_last(t: torch.Tensor) -> torch.Tensor:
            return t.view(*t.size()[:-1], self.num_heads, t.size(-1) // self.num_heads)

        queries, keys, values = (
            split_last(t).transpose(1, 2) for t in (self.q_head(x), self.k_head(x), self.v_head(x))
        )
        score = queries @ keys.transpose(-2, -1) * torch.rsqrt(torch.tensor(keys.size(-1)).type_as(keys))
        score = score - score.max(dim=-1, keepdim=True).values  # softmax_func
        exp_logits = torch.exp(score)
        sim_score = exp_logits / exp_logits.sum(dim=-1, keepdim=True)
        atten = (sim_score @ values).transpose(1, 2).contiguous()
        return atten.view(*atten.size()[:-2], -1)


class OfficialSimpleBlock(nn.Module):
    """`SimpleSelfAttentionBlock` (l. 203-239) after `reset_params`: linear_head(layernorm(x + atten(x)))."""

    def __init__(self, num_heads: int, dim: int) -> None:
        super().__init__()
        self.atten_module = OfficialAttention(num_heads, dim)
        self.layernorm = nn.LayerNorm(dim, eps=1e-6)
        self.linear_head = nn.Linear(dim, dim)
        with torch.no_grad():
            self.linear_head.weight.copy_(torch.eye(dim))
            self.linear_head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_head(self.layernorm(x + self.atten_module(x)))


class OfficialTransformer(nn.Module):
    """`Transformer(num_blocks, is_simpleatten=True, init_mode='eye')` (l. 242-308) after `reset_params`,
    with the position embeddings given (the official table is [1, 37, 512]: 6 x 6 maps)."""

    def __init__(self, num_blocks: int, num_heads: int, position_embeddings: torch.Tensor) -> None:
        super().__init__()
        dim = position_embeddings.shape[-1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embeddings = nn.Parameter(position_embeddings.reshape(1, -1, dim).clone())
        self.blocks = nn.ModuleList(OfficialSimpleBlock(num_heads, dim) for _ in range(num_blocks))

    def forward(self, protos: torch.Tensor) -> torch.Tensor:
        protos = torch.transpose(torch.flatten(protos, start_dim=2), 1, 2)
        protos = torch.cat((self.cls_token.expand(protos.size(0), -1, -1), protos), dim=1)
        protos = protos + self.pos_embeddings
        for block in self.blocks:
            protos = block(protos)
        return protos[:, 0, :]


def official_copa_transformer(
    support_maps: torch.Tensor,
    labels: torch.Tensor,
    query_maps: torch.Tensor,
    prototype_positions: torch.Tensor,
    image_positions: torch.Tensor,
    lr: float,
    weight_decay: float,
    tau: float = 2.0,
    steps: int = 50,
    num_heads: int = 8,
    num_blocks: int = 1,
) -> tuple[np.ndarray, torch.Tensor]:
    """`models/adaptation.py::pa_adaptation` with `encoder.type == 'transformer'` (l. 65-88, 109-175):
    class-mean maps (`compute_prototypes`), Adam over [feature_encoder, prototype_encoder], `steps` steps
    on `symmetric_CE(feature_encoder(support), prototype_encoder(prototypes))`; returns the losses and the
    query logits 10 * cos(feature_encoder(query), prototype_encoder(prototypes)) (`symmetric_CE`'s
    accuracy logits, models/losses.py l. 294-297). Module and loss in the maps' dtype."""
    dtype = support_maps.dtype
    prototype_encoder = OfficialTransformer(num_blocks, num_heads, prototype_positions).to(dtype)
    feature_encoder = OfficialTransformer(num_blocks, num_heads, image_positions).to(dtype)
    optimizer = torch.optim.Adam(
        [{"params": feature_encoder.parameters()}, {"params": prototype_encoder.parameters()}],
        lr=lr,
        weight_decay=weight_decay,
    )
    unique = torch.arange(int(labels.max()) + 1).unsqueeze(1)
    indicate = unique.eq(labels.reshape(1, -1)).to(dtype)
    _, c, h, w = support_maps.shape
    prototypes = (indicate @ support_maps.flatten(1) / indicate.sum(dim=1, keepdim=True)).view(-1, c, h, w)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = symmetric_ce(feature_encoder(support_maps), prototype_encoder(prototypes), labels, tau)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return np.array(losses), cosine_logits(feature_encoder(query_maps), prototype_encoder(prototypes))


# --- SUR (dvornikita/SUR, commit 2c3c5781) ----------------------------------------------------------------
# Features come as the official dicts, backbone name -> [N, d], in the set's order. Everything runs in the
# features' dtype (the official lambdas are float32, `torch.zeros` on `device`), so float64 runs are possible.


def official_sur_cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor):
    """`models/losses.py::cross_entropy_loss` (l. 9-17): the mean NLL of the log-softmax, with the stats dict
    (loss, accuracy) and the predictions dict."""
    log_p_y = F.log_softmax(logits, dim=1)
    preds = log_p_y.argmax(1)
    labels = targets.type(torch.long)
    loss = F.nll_loss(log_p_y, labels, reduction="mean")
    acc = torch.eq(preds, labels).float().mean()
    stats_dict = {"loss": loss.item(), "acc": acc.item()}
    pred_dict = {"preds": preds.cpu().numpy(), "labels": labels.cpu().numpy()}
    return loss, stats_dict, pred_dict


def official_sur_compute_prototypes(
    embeddings: torch.Tensor, labels: torch.Tensor, n_way: int
) -> torch.Tensor:
    """`models/losses.py::compute_prototypes` (l. 37-42): class by class through `nonzero()` indices
    ([k, 1], so each mean is [1, D], broadcast into its row)."""
    prots = torch.zeros(n_way, embeddings.shape[-1]).type(embeddings.dtype).to(embeddings.device)
    for i in range(n_way):
        prots[i] = embeddings[(labels == i).nonzero(), :].mean(0)
    return prots


def official_sur_prototype_logits(
    support_embeddings: torch.Tensor,
    support_labels: torch.Tensor,
    query_embeddings: torch.Tensor,
    query_labels: torch.Tensor,
) -> torch.Tensor:
    """The logits `models/losses.py::prototype_loss` (l. 20-30, distance='cos') builds: n_way from the
    *query* labels (l. 22), 10 * `F.cosine_similarity(..., eps=1e-30)` against the class means (l. 30)."""
    n_way = len(query_labels.unique())
    prots = official_sur_compute_prototypes(support_embeddings, support_labels, n_way).unsqueeze(0)
    embeds = query_embeddings.unsqueeze(1)
    return F.cosine_similarity(embeds, prots, dim=-1, eps=1e-30) * 10


def official_sur_prototype_loss(
    support_embeddings: torch.Tensor,
    support_labels: torch.Tensor,
    query_embeddings: torch.Tensor,
    query_labels: torch.Tensor,
):
    """`models/losses.py::prototype_loss` (l. 20-34) with distance='cos': `cross_entropy_loss` (l. 34) of
    those logits; returns (loss, stats, predictions) as the official function does."""
    logits = official_sur_prototype_logits(support_embeddings, support_labels, query_embeddings, query_labels)
    return official_sur_cross_entropy_loss(logits, query_labels)


def official_apply_selection(
    features_dict: dict[str, torch.Tensor], lambdas: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """`models/sur.py::apply_selection` (l. 9-20): sigmoid of the lambdas (`models/model_utils.py` l. 13,
    `sigmoid = nn.Sigmoid()`), each backbone's features divided by their norm (no floor), stacked on a new
    last axis ([N, d, B]), weighted and flattened: element j of every backbone, then element j + 1."""
    lambdas_01 = torch.sigmoid(lambdas)
    features_list = list(features_dict.values())
    if normalize:
        features_list = [f / (f**2).sum(-1, keepdim=True).sqrt() for f in features_list]
    n_cont = features_list[0].shape[0]
    concat_feat = torch.stack(features_list, -1)
    return (concat_feat * lambdas_01).reshape([n_cont, -1])


def official_sur(
    context_features_dict: dict[str, torch.Tensor], context_labels: torch.Tensor, max_iter: int = 40
) -> tuple[torch.Tensor, list[float]]:
    """`models/sur.py::sur` (l. 23-40): lambdas zeros [1, 1, B] (in the features' dtype here), Adadelta at
    lr 3000 / number of classes (PyTorch's rho and eps), `max_iter` steps on the support set's
    `prototype_loss` against itself. Returns (lambdas [1, 1, B], each step's loss, which the official loop
    computes and discards)."""
    dtype = next(iter(context_features_dict.values())).dtype
    lambdas = torch.zeros([1, 1, len(context_features_dict)], dtype=dtype)
    lambdas.requires_grad_(True)
    n_classes = len(np.unique(context_labels.cpu().numpy()))
    optimizer = torch.optim.Adadelta([lambdas], lr=(3e3 / n_classes))
    losses = []
    for _ in range(max_iter):
        optimizer.zero_grad()
        selected_features = official_apply_selection(context_features_dict, lambdas)
        loss, stat, _ = official_sur_prototype_loss(
            selected_features, context_labels, selected_features, context_labels
        )
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
    return lambdas, losses


def official_sur_test_episode(
    context_features_dict: dict[str, torch.Tensor],
    context_labels: torch.Tensor,
    target_features_dict: dict[str, torch.Tensor],
    target_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, float, list[float]]:
    """One episode of `test.py::main` (l. 56-63): `sur(..., max_iter=40)`, `apply_selection` of context and
    target with the fitted lambdas, `prototype_loss(selected_context, ..., selected_target, ...)`.
    Returns (lambdas [1, 1, B], the target logits that loss scores, its accuracy, the per-step losses)."""
    selection_params, losses = official_sur(context_features_dict, context_labels, max_iter=40)
    with torch.no_grad():
        selected_context = official_apply_selection(context_features_dict, selection_params)
        selected_target = official_apply_selection(target_features_dict, selection_params)
        logits = official_sur_prototype_logits(
            selected_context, context_labels, selected_target, target_labels
        )
        final_acc = official_sur_prototype_loss(
            selected_context, context_labels, selected_target, target_labels
        )[1]["acc"]
    return selection_params.detach(), logits, final_acc, losses


# --- URT (liulu112601/URT, commit edc551f2) ---------------------------------------------------------------
# Features are the official cached [N, n_extractors, d] tensors. `torch.nn.DataParallel` (urt-avg-head.py
# l. 156) is left out: on one device it calls the module, and on several it splits the classes, each scored
# on its own, so the result is the same. Everything runs in the module's / features' dtype.


class OfficialURTPropagation(nn.Module):
    """`fast-exps/lib/models/new_prop_prototype.py::URTPropagation` (l. 39-89): linear_q (query_dim ->
    hid_dim) of the flattened class prototype, linear_k (key_dim -> hid_dim) of each extractor's part, both
    with bias, weights redrawn from N(0, 0.001^2) (l. 50-52; biases keep nn.Linear's default); score =
    softmax over extractors of temp * (cosine, or dot product / sqrt(fea_dim), fea_dim being d, l. 85).

    Left out: `linear_v_w` (l. 45-46, eight identity matrices, which hard-codes 8 extractors) and
    `forward_transform` (l. 54-72), its only user. `urt-avg-head.py` never passes a `transform` to
    `apply_urt_avg_selection` (l. 87-88, 193-194), so `linear_v_w` gets no gradient and Adam never updates
    or decays it; building it takes no random numbers (`torch.eye`), so the initialisation draws the same
    numbers in the same order without it. The number of extractors is then free (query_dim / key_dim)."""

    def __init__(
        self, key_dim: int, query_dim: int, hid_dim: int, temp: float = 1, att: str = "cosine"
    ) -> None:
        super().__init__()
        self.linear_q = nn.Linear(query_dim, hid_dim, bias=True)
        self.linear_k = nn.Linear(key_dim, hid_dim, bias=True)
        self.temp = temp
        self.att = att
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.001)

    def forward(self, cat_proto: torch.Tensor) -> torch.Tensor:
        n_class, n_extractors, fea_dim = cat_proto.shape
        q = cat_proto.view(n_class, -1)
        k = cat_proto
        q_emb = self.linear_q(q)
        k_emb = self.linear_k(k)
        if self.att == "cosine":
            raw_score = F.cosine_similarity(
                q_emb.view(n_class, 1, -1), k_emb.view(n_class, n_extractors, -1), dim=-1
            )
        elif self.att == "dotproduct":
            raw_score = torch.sum(
                q_emb.view(n_class, 1, -1) * k_emb.view(n_class, n_extractors, -1), dim=-1
            ) / (math.sqrt(fea_dim))
        else:
            raise ValueError(f"invalid att type : {self.att}")
        return F.softmax(self.temp * raw_score, dim=1)


class OfficialMultiHeadURT(nn.Module):
    """`new_prop_prototype.py::MultiHeadURT` (l. 92-107): n_head `URTPropagation`s, scores stacked on a last
    axis, [n_class, n_extractors, n_head]. `urt-avg-head.py` l. 155 builds it with key_dim=512,
    query_dim=8*512, hid_dim=1024, temp=1, att="dotproduct"."""

    def __init__(
        self,
        key_dim: int,
        query_dim: int,
        hid_dim: int,
        temp: float = 1,
        att: str = "cosine",
        n_head: int = 1,
    ) -> None:
        super().__init__()
        layers = []
        for _ in range(n_head):
            layer = OfficialURTPropagation(key_dim, query_dim, hid_dim, temp, att)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)

    def forward(self, cat_proto: torch.Tensor) -> torch.Tensor:
        score_lst = []
        for layer in self.layers:
            score = layer(cat_proto)
            score_lst.append(score)
        return torch.stack(score_lst, dim=-1)


def official_get_lambda_urt_avg(
    context_features: torch.Tensor,
    context_labels: torch.Tensor,
    num_labels: int,
    model: nn.Module,
    normalize=True,
) -> torch.Tensor:
    """`new_prop_prototype.py::get_lambda_urt_avg` (l. 123-134): `F.normalize`d features, class prototypes
    by boolean masks, the model's scores averaged over classes: [n_extractors, n_head]."""
    if normalize:
        context_features = F.normalize(context_features, dim=-1)
    proto_list = []
    for label in range(num_labels):
        proto = context_features[context_labels == label].mean(dim=0)
        proto_list.append(proto)
    proto = torch.stack(proto_list)
    score_proto = model(proto)
    return torch.mean(score_proto, dim=0)


def official_apply_urt_avg_selection(
    context_features: torch.Tensor, selection_params: torch.Tensor, normalize: bool, value: str = "sum"
) -> torch.Tensor:
    """`new_prop_prototype.py::apply_urt_avg_selection` (l. 136-158) with transform=None (the only way
    urt-avg-head.py calls it): per head the weighted sum (value="sum") or the weighted features
    (value="cat") of the `F.normalize`d features, stacked on axis 1 and flattened."""
    selection_params = torch.transpose(selection_params, 0, 1)
    n_samples, n_extractors, fea_dim = context_features.shape
    urt_fea_lst = []
    if normalize:
        context_features = F.normalize(context_features, dim=-1)
    for params in selection_params:
        trans_features = context_features
        if value == "sum":
            urt_features = torch.sum(params.view(1, n_extractors, 1) * trans_features, dim=1)
        elif value == "cat":
            urt_features = params.view(1, n_extractors, 1) * trans_features
        urt_fea_lst.append(urt_features)
    return torch.stack(urt_fea_lst, dim=1).view(n_samples, -1)


def official_get_cosine_logits(selected_target: torch.Tensor, proto: torch.Tensor, temp) -> torch.Tensor:
    """`fast-exps/urt-avg-head.py::get_cosine_logits` (l. 61-65): temp * `F.cosine_similarity` (default
    eps, 1e-8) of every target row with every prototype."""
    n_query, feat_dim = selected_target.shape
    n_classes, feat_dim = proto.shape
    return temp * F.cosine_similarity(
        selected_target.view(n_query, 1, feat_dim), proto.view(1, n_classes, feat_dim), dim=-1
    )


def official_urt_episode(
    model: nn.Module,
    cosine_temp: torch.Tensor,
    context_features: torch.Tensor,
    context_labels: torch.Tensor,
    target_features: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared body of `urt-avg-head.py`'s `test_all_dataset` (l. 83-99) and training loop (l. 187-200):
    n_classes from `np.unique`, the averaged lambdas, the selected context and target features, the class
    means of the selected context, the cosine logits. Returns (logits [n_target, n_classes], lambdas)."""
    n_classes = len(np.unique(context_labels.cpu().numpy()))
    avg_urt_params = official_get_lambda_urt_avg(
        context_features, context_labels, n_classes, model, normalize=True
    )
    urt_context_features = official_apply_urt_avg_selection(context_features, avg_urt_params, normalize=True)
    urt_target_features = official_apply_urt_avg_selection(target_features, avg_urt_params, normalize=True)
    proto_list = []
    for label in range(n_classes):
        proto = urt_context_features[context_labels == label].mean(dim=0)
        proto_list.append(proto)
    urt_proto = torch.stack(proto_list)
    return official_get_cosine_logits(urt_target_features, urt_proto, cosine_temp), avg_urt_params


def official_urt_test_logits(
    model: nn.Module,
    cosine_temp: torch.Tensor,
    context_features: torch.Tensor,
    context_labels: torch.Tensor,
    target_features: torch.Tensor,
) -> torch.Tensor:
    """`urt-avg-head.py::test_all_dataset` on one episode (l. 69, 83-99): the model in eval mode, the
    logits scored under `torch.no_grad()` (l. 98-99)."""
    model.eval()
    with torch.no_grad():
        return official_urt_episode(model, cosine_temp, context_features, context_labels, target_features)[0]


def official_urt_optimizer(
    model: nn.Module, cosine_temp: torch.Tensor, lr: float, weight_decay: float, max_iter: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """`urt-avg-head.py::main` l. 159-163: Adam over the model's parameters and the cosine temperature (one
    group, weight decay on all), `CosineAnnealingLR(T_max=max_iter)`."""
    params = [p for p in model.parameters()] + [cosine_temp]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer=optimizer, T_max=max_iter)
    return optimizer, lr_scheduler


def official_urt_penalty(avg_urt_params: torch.Tensor, n_head: int) -> torch.Tensor:
    """`urt-avg-head.py` l. 191: `torch.pow(torch.norm(Lambda^T Lambda - I), 2)` (Frobenius norm)."""
    return torch.pow(
        torch.norm(torch.transpose(avg_urt_params, 0, 1) @ avg_urt_params - torch.eye(n_head)), 2
    )


def official_urt_train_step(
    model: nn.Module,
    cosine_temp: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    context_features: torch.Tensor,
    context_labels: torch.Tensor,
    target_features: torch.Tensor,
    target_labels: torch.Tensor,
    n_head: int,
    penalty_coef: float,
) -> torch.Tensor:
    """One iteration of `urt-avg-head.py::main`'s training loop (l. 186-205): train mode, the episode's
    logits, loss = cross-entropy + penalty_coef * penalty, zero_grad, backward, Adam step, scheduler step.
    Returns the loss; each parameter's `.grad` still holds this step's gradient afterwards."""
    model.train()
    logits, avg_urt_params = official_urt_episode(
        model, cosine_temp, context_features, context_labels, target_features
    )
    penalty = official_urt_penalty(avg_urt_params, n_head)
    loss = F.cross_entropy(logits, target_labels) + penalty_coef * penalty
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    lr_scheduler.step()
    return loss.detach()
