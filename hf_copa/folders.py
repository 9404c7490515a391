"""Images from folders: support sets as one sub-folder per class (the ImageFolder layout), queries as files or
folders, read by one rule so that nothing is guessed.

- A class is a visible sub-folder of the support folder; its images are every image file below it, at any
  depth (as torchvision's ImageFolder reads them).
- A query folder is searched the same way, at any depth.
- Hidden files and folders (names starting with ".", such as `.ipynb_checkpoints` or `.DS_Store`) are
  never read; when they hold images, a `SkippedFilesWarning` says so. Files that are not images (by their
  suffix) are skipped with the same warning, which names a few of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from .validation import CopaValueError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class SkippedFilesWarning(UserWarning):
    """Some files under a support or query folder were not read (hidden, or not images)."""


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: str | Path) -> list[Path]:
    """The image files below `folder` at any depth, hidden ones left out (and reported), sorted by path."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    hidden = [p for p in files if _is_hidden(p, folder)]
    visible = [p for p in files if not _is_hidden(p, folder)]
    images = [p for p in visible if _is_image(p)]
    _report(folder, [p for p in hidden if _is_image(p)], [p for p in visible if not _is_image(p)])
    return images


def _report(folder: Path, hidden_images: list[Path], others: list[Path]) -> None:
    parts = []
    if hidden_images:
        places = sorted({str(p.relative_to(folder).parts[0]) for p in hidden_images})
        parts.append(f"{len(hidden_images)} image(s) in hidden files or folders ({_few(places)})")
    if others:
        parts.append(f"{len(others)} file(s) that are not images ({_few([p.name for p in others])})")
    if parts:
        warnings.warn(
            f"Not read under {str(folder)!r}: " + "; ".join(parts) + f". Images are files ending in "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}; names starting with '.' are hidden.",
            SkippedFilesWarning,
            stacklevel=3,
        )


def _few(names: Iterable[str], limit: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_class_folders(root: str | Path) -> tuple[list[Path], list[str]]:
    """(image paths, class names) from `root/<class>/...<image>`; classes in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise CopaValueError(
            f"Support folder {str(root)!r} does not exist; give a folder with one sub-folder per class."
        )
    hidden = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".")]
    hidden_images = [p for folder in hidden for p in folder.rglob("*") if p.is_file() and _is_image(p)]
    loose = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and _is_image(p)]
    if hidden_images:
        _report(root, hidden_images, [])
    if loose:
        warnings.warn(
            f"{len(loose)} image(s) directly in {str(root)!r} ({_few(p.name for p in loose)}) belong to no "
            "class and were not read: put each class's images in a sub-folder named after the class.",
            SkippedFilesWarning,
            stacklevel=2,
        )
    paths, labels, empty = [], [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = list_images(class_dir)
        if not images:
            empty.append(class_dir.name)
        paths += images
        labels += [class_dir.name] * len(images)
    if empty:
        raise CopaValueError(
            f"Class folder(s) {empty} in {str(root)!r} hold no images ({sorted(IMAGE_SUFFIXES)})."
        )
    if len(set(labels)) < 2:
        raise CopaValueError(
            f"{str(root)!r} must hold at least 2 class sub-folders with images, found {sorted(set(labels))}."
        )
    return paths, labels


def query_images(items: Iterable[str | Path]) -> list[Path]:
    """Query image paths from files and folders (folders searched at any depth), in the order given."""
    items = list(items)
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths += list_images(path)
        elif path.is_file():
            paths.append(path)
        else:
            raise CopaValueError(f"Query {str(item)!r} is neither an image file nor a folder.")
    if not paths:
        raise CopaValueError(f"No query images found in {[str(i) for i in items]}.")
    return paths


def sample_task_dir(name: str = "quickdraw") -> Path:
    """The bundled example task: `support/<class>/*.png`, `query/<class>/*.png` (Quick, Draw!, CC BY 4.0)."""
    path = Path(str(resources.files("hf_copa") / "assets" / "samples" / name))
    if not path.is_dir():
        raise CopaValueError(f"No bundled sample task named {name!r}.")
    return path
