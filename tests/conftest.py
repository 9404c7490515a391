"""Shared test fixtures: where the reference outputs and datasets live, and the tiny test backbone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hf_copa import CopaConfig, CopaModel

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("HF_COPA_SHARED", REPO_ROOT.parent / "shared"))
# A backbone small enough for unit tests: 8-d stem, four stages, 16-d features, 32x32 inputs.
TINY_CONFIG = {"embedding_size": 8, "hidden_sizes": [8, 8, 16, 16], "image_size": 32}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip locally, but fail in CI (CI=true): a test must never silently not run there."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: this test must run)")
    pytest.skip(reason)


def tiny_backbone(seed: int = 0, **overrides) -> CopaModel:
    """A seeded `TINY_CONFIG` backbone (fields overridable) in eval mode, with non-trivial BatchNorm
    statistics, so that a forward pass in training mode would give other features."""
    torch.manual_seed(seed)
    model = CopaModel(CopaConfig(**{**TINY_CONFIG, **overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_model() -> CopaModel:
    return tiny_backbone()


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny models: they gain nothing from threads, and on a busy 2-core machine
    OpenMP barriers slow them 30-50x. The previous thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_path(name: str) -> Path:
    """A folder of ../shared (or $HF_COPA_SHARED); a missing one skips the test, or fails it in CI."""
    path = SHARED_DIR / name
    if not path.is_dir():
        unavailable(f"{name} not found at {path} (set HF_COPA_SHARED)")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return shared_path("reference")


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    return shared_path("datasets")
