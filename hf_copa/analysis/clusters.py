"""Cluster quality of embeddings (silhouette) and their 2-D maps (UMAP as the official figures, or PCA), from
scikit-learn and umap-learn: imported here only, when first used."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..validation import CopaMissingDependency, CopaValueError
from .gap import _matrix, unit_rows

MAP_METHODS = ("auto", "umap", "pca")
# The official cluster figures: umap.UMAP(random_state=42) on L2-normalised support embeddings.
UMAP_SEED = 42


def require(module: str, extra: str = "analysis") -> Any:
    """Import an optional dependency, or say which extra installs it."""
    import importlib

    try:
        with warnings.catch_warnings():  # umap warns at import that TensorFlow (ParametricUMAP) is absent
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ImportError:
        package = {"sklearn": "scikit-learn", "umap": "umap-learn"}.get(module, module)
        raise CopaMissingDependency(
            f"hf_copa's analysis needs {package}, which is not installed: pip install 'hf-copa[{extra}]'."
        ) from None


def silhouette(embeddings: Any, labels: Any) -> float | None:
    """Mean silhouette (scikit-learn, Euclidean) of L2-normalised embeddings [N, d] under their labels, in
    [-1, 1], higher = tighter, better separated classes; None where it is undefined (fewer than 2 classes,
    or as many classes as points, e.g. a 1-shot support set)."""
    points = unit_rows(_matrix(embeddings, "embeddings")).numpy()
    labels = np.asarray(labels)
    if labels.shape != (len(points),):
        raise CopaValueError(f"Got {len(points)} embeddings but {labels.size} labels; they must match.")
    if not 2 <= len(np.unique(labels)) <= len(points) - 1:
        return None
    metrics = require("sklearn.metrics")
    return float(metrics.silhouette_score(points, labels, metric="euclidean"))


def embedding_map(embeddings: Any, method: str = "auto", seed: int = UMAP_SEED) -> tuple[np.ndarray, str]:
    """([N, 2] coordinates, the method used) of L2-normalised embeddings [N, d].

    "umap" is umap-learn's UMAP (random_state 42, as the official figures; fewer neighbours than its default
    15 when there are fewer points); "pca" scikit-learn's PCA (deterministic signs), the light choice;
    "auto" is UMAP when umap-learn is installed and there are at least 5 points, else PCA.
    """
    if method not in MAP_METHODS:
        raise CopaValueError(f"The 2-D map must be one of {MAP_METHODS}, got {method!r}.")
    points = unit_rows(_matrix(embeddings, "embeddings")).numpy()
    if method == "auto":
        try:
            require("umap", "umap")
            method = "umap" if len(points) >= 5 else "pca"
        except ImportError:
            method = "pca"
    if method == "umap":
        if len(points) < 5:
            raise CopaValueError(f"UMAP needs at least 5 points, got {len(points)}; use the PCA map.")
        umap = require("umap", "umap")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state": the seed is the point
            reducer = umap.UMAP(n_neighbors=min(15, len(points) - 1), random_state=seed)
            return np.asarray(reducer.fit_transform(points), dtype=np.float64), "umap"
    decomposition = require("sklearn.decomposition")
    if len(points) == 1:
        return np.zeros((1, 2)), "pca"
    components = min(2, *points.shape)
    coords = decomposition.PCA(n_components=components, svd_solver="full").fit_transform(points)
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords.astype(np.float64), "pca"
