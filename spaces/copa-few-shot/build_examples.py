"""Rebuild the Space's bundled example tasks from the shared datasets (real images, a few hundred bytes each).

    python spaces/copa-few-shot/build_examples.py [--datasets ../shared/datasets]

Writes `hf_copa/assets/examples/<task>/{support,query}/<class>/<row>.png` (the layout `hf_copa.folders`
reads) and a README with each image source and licence. The choice of images is seeded, so a rebuild
gives the same files. The Quick, Draw! task is the package's own sample (`hf_copa/assets/samples`).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import datasets
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUT = REPO_ROOT / "hf_copa" / "assets" / "examples"
SHOTS, QUERIES, SEED = 5, 2, 0

# task folder -> (dataset folder, classes, licence line for the README)
TASKS = {
    "fashion_mnist": (
        "fashion_mnist",
        ["trouser", "bag", "sneaker", "ankle boot"],
        "Fashion-MNIST (Xiao, Rasul and Vollgraf, Zalando Research, 2017), test set; MIT licence.",
    ),
    "mnist": (
        "mnist",
        ["3", "5", "8", "9"],
        "MNIST (LeCun, Cortes and Burges), test set; CC BY-SA 3.0.",
    ),
    "omniglot": (
        "omniglot",
        ["character1201", "character1305", "character1402", "character1517", "character1600"],
        "Omniglot (Lake et al., Science 2015), images_evaluation (classes the backbone never saw in "
        "training); MIT licence.",
    ),
}


def build(datasets_dir: Path) -> None:
    if OUTPUT.exists():
        shutil.rmtree(OUTPUT)
    lines = [
        "# Example tasks of the CoPA Space",
        "",
        f"Built by `spaces/copa-few-shot/build_examples.py` (seed {SEED}): {SHOTS} support and {QUERIES} "
        "query images per class, drawn from the test splits of the datasets below, saved as PNG unchanged. "
        "The file name is the image's row in that split.",
        "",
    ]
    for task, (folder, classes, licence) in TASKS.items():
        split = datasets.load_dataset(str(datasets_dir / folder), split="test")
        names = split.features["label"].names
        labels = np.asarray(split["label"])
        rng = np.random.default_rng(SEED)
        for name in classes:
            rows = rng.choice(np.flatnonzero(labels == names.index(name)), SHOTS + QUERIES, replace=False)
            for part, chosen in (("support", rows[:SHOTS]), ("query", rows[SHOTS:])):
                target = OUTPUT / task / part / name
                target.mkdir(parents=True, exist_ok=True)
                for row in sorted(int(r) for r in chosen):
                    split[row]["image"].save(target / f"{row}.png", optimize=True)
        lines.append(f"- `{task}/`: {', '.join(classes)}. {licence}")
    (OUTPUT / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=REPO_ROOT.parent / "shared" / "datasets")
    build(parser.parse_args().datasets)
