"""CoPA's transformer encoder (the paper's App. E.4) as pure functions on a dict of tensors.

Official code (HongduanTian/CoPA, commit f829b529): `models/transformer.py`, the `Transformer` with
`is_simpleatten=True, init_mode='eye'` that `copa_pa.py` (l. 48-57) builds for `--encoder.type
transformer`: a class token and position embeddings are added to the tokens of a [C, h, w] feature map
(one token per position, l. 285-288), then `num_blocks` `SimpleSelfAttentionBlock`s (l. 203-239), each
x -> Linear(LayerNorm(x + MultiHeadAttention(x))), LayerNorm eps 1e-6, attention scaled by 1/sqrt(head
dim) (l. 96-105); the output is the class token's (l. 292). `reset_params` (called for every task) sets the
query, key, value and output maps to the identity with zero biases, the class token to zero and the position
embeddings to N(0, 0.02^2).

Where this differs: the official position embeddings are a fixed [1, 37, 512] table (6 x 6 maps of
84-pixel inputs plus the class token); here they have 1 + h*w rows for the backbone's own map size, so other
backbones (the bundled 4 x 4 one) work too. Parameters live in a flat dict, so a head can store and apply
them without a module.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-6
POSITION_INIT_STD = 0.02


def identity_encoder(
    dim: int, positions: int, blocks: int, position_embeddings: torch.Tensor
) -> dict[str, torch.Tensor]:
    """A freshly reset encoder (the official 'eye' init) whose position embeddings [positions + 1, dim] are
    given (they are the only random part)."""
    like = position_embeddings
    if tuple(like.shape) != (positions + 1, dim):
        raise ValueError(f"position embeddings must be [{positions + 1}, {dim}], got {tuple(like.shape)}")
    eye, zeros, ones = torch.eye(dim).to(like), like.new_zeros(dim), like.new_ones(dim)
    params = {"cls_token": zeros.clone(), "position_embeddings": like.clone()}
    for b in range(blocks):
        for name in ("query", "key", "value", "output"):
            params[f"blocks.{b}.{name}.weight"] = eye.clone()
            params[f"blocks.{b}.{name}.bias"] = zeros.clone()
        params[f"blocks.{b}.norm.weight"] = ones.clone()
        params[f"blocks.{b}.norm.bias"] = zeros.clone()
    return params


def random_position_embeddings(
    rng: np.random.Generator, positions: int, dim: int, like: torch.Tensor
) -> torch.Tensor:
    """[positions + 1, dim] draws of N(0, 0.02^2) from a seeded numpy generator."""
    values = POSITION_INIT_STD * rng.standard_normal((positions + 1, dim))
    return torch.as_tensor(values, dtype=like.dtype, device=like.device)


def num_blocks(params: dict[str, torch.Tensor]) -> int:
    return len({name.split(".")[1] for name in params if name.startswith("blocks.")})


def encode(params: dict[str, torch.Tensor], maps: torch.Tensor, heads: int) -> torch.Tensor:
    """[n, dim, h, w] feature maps -> [n, dim]: the class token after every block."""
    tokens = maps.flatten(2).transpose(1, 2)  # [n, h*w, dim]
    cls = params["cls_token"].expand(len(tokens), 1, -1)
    x = torch.cat([cls, tokens], dim=1) + params["position_embeddings"]
    for b in range(num_blocks(params)):
        x = x + _attention(params, f"blocks.{b}.", x, heads)
        x = F.layer_norm(
            x,
            x.shape[-1:],
            params[f"blocks.{b}.norm.weight"],
            params[f"blocks.{b}.norm.bias"],
            LAYER_NORM_EPS,
        )
        x = F.linear(x, params[f"blocks.{b}.output.weight"], params[f"blocks.{b}.output.bias"])
    return x[:, 0]


def _attention(params: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    n, length, dim = x.shape

    def split(name: str) -> torch.Tensor:
        projected = F.linear(x, params[f"{prefix}{name}.weight"], params[f"{prefix}{name}.bias"])
        return projected.view(n, length, heads, dim // heads).transpose(1, 2)  # [n, heads, S, dim/heads]

    queries, keys, values = split("query"), split("key"), split("value")
    scores = torch.softmax(queries @ keys.transpose(-2, -1) / (dim // heads) ** 0.5, dim=-1)
    return (scores @ values).transpose(1, 2).reshape(n, length, dim)
