"""Dataset splits as hf_copa reads them: `PATH_OR_ID[:SPLIT]` specs, loading a split, reading raw images.

Evaluation, feature extraction and training all name datasets, load them and read their images here.
Images are always read raw from one column: a dataset's format or transform (`with_transform`,
`set_format`) is ignored, because a transform does not change the dataset fingerprint and would make
cached features stale (use `dataset.map(...)`, which does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .validation import CopaValueError


@dataclass(frozen=True)
class SplitSpec:
    """A dataset split named as `PATH_OR_ID[:SPLIT]`: a local folder in Hub layout or a Hub id."""

    path: str
    split: str

    @property
    def name(self) -> str:
        """The last path component: the domain's name in tables and results."""
        return Path(self.path).name

    @classmethod
    def parse(cls, spec: str, default_split: str) -> SplitSpec:
        """`path/to/omniglot:train` -> (path/to/omniglot, train); an existing path is never split."""
        path, _, split = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
        path = path.rstrip("/")
        if not path:
            raise CopaValueError(f"Empty dataset in {spec!r}; use PATH_OR_ID[:SPLIT].")
        return cls(path=path, split=split or default_split)


def load_split(path: str, split: str) -> Any:
    """`datasets.load_dataset(path, split=split)`, with a clear error for a split the dataset lacks."""
    import datasets

    try:
        return datasets.load_dataset(path, split=split)
    except ValueError as err:
        if "split" in str(err).lower():
            raise CopaValueError(f"Dataset {path!r} has no split {split!r}: {err}") from None
        raise


class RawImages:
    """The images of one column of a dataset split, read raw by row (picklable for DataLoader workers)."""

    def __init__(self, dataset: Any, image_column: str = "image", encoded: bool = False) -> None:
        """`encoded`: read an image column undecoded, as `{"bytes", "path"}` dicts (for decoders of their own,
        such as the Meta-Dataset one); other columns are read as they are."""
        if image_column not in dataset.column_names:
            raise CopaValueError(
                f"The dataset has no column {image_column!r}; its columns are {dataset.column_names}. "
                "Pass image_column=<the column holding the images> (hf-copa: --image-column)."
            )
        self.dataset = dataset.with_format(None).select_columns([image_column])
        if encoded:
            import datasets

            feature = self.dataset.features[image_column]
            if isinstance(feature, datasets.Image) and feature.decode:
                self.dataset = self.dataset.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, rows: Sequence[int] | np.ndarray) -> list[Any]:
        """The images of `rows`, in that order."""
        return self.dataset[[int(row) for row in rows]][self.image_column]

    def span(self, start: int, stop: int) -> list[Any]:
        """The images of rows start..stop-1 (one contiguous read)."""
        return self.dataset[start:stop][self.image_column]
