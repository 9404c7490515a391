"""The paper's analyses (CoPA, Tian et al., NeurIPS 2024): the prototype–image gap, its bound under a
linear map, the gap along adaptation, cluster quality, the gap-enlarging experiment and the cost per
episode, as pure functions (`gap`, `clusters`), over episodes (`runner.analyze`, the `hf-copa analyze`
command) and as figures (`figures`).

scikit-learn, umap-learn and matplotlib are imported only when a function needs them (the `analysis` extra:
`pip install 'hf-copa[analysis]'`; UMAP: `hf-copa[umap]`), so `import hf_copa` does not load them.
"""

from .clusters import embedding_map, silhouette
from .gap import (
    EpisodeGap,
    GapTrace,
    episode_gap,
    gap_bound,
    gap_enlarging_curve,
    gap_vector,
    head_maps,
    paired_prototypes,
    prototype_image_gap,
)
from .runner import AnalysisResult, analyze

__all__ = [
    "AnalysisResult",
    "EpisodeGap",
    "GapTrace",
    "analyze",
    "embedding_map",
    "episode_gap",
    "gap_bound",
    "gap_enlarging_curve",
    "gap_vector",
    "head_maps",
    "paired_prototypes",
    "prototype_image_gap",
    "silhouette",
]
