"""Write eight stand-ins for URL's single-domain (sdl) networks, in the layout URL's code saves them.

URL distributes its eight single-domain ResNet-18s (`saved_results/sdl/weights/<name>-net/model_best.pth.tar`,
trained by `scripts/train_resnet18_sdl.sh`), which cannot be downloaded here. This script writes files of
the same layout, for trying `hf-copa convert`, `hf-copa bundle`, SUR and URT end to end: each is
`CheckPointer.save_checkpoint`'s dict (`epoch`, `args` with `model.name` and `data.train` naming the source,
`state_dict`, `best_val_acc`, `best_val_loss`), its `state_dict` `models/resnet18.py`'s (the backbone's names,
and one `cls_fn` linear layer over the source's training classes). The weights are random (seeded per
source) and the network narrower than URL's (stage widths W, 2W, 4W, 8W instead of 64-512) so that eight of
them run in seconds on a CPU: the files stand in for the real ones' format, not for their features.

    python scripts/make_sdl_standins.py --output runs/sdl-standins --json runs/sdl-standins.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _quick import add_quick_flag, parse_quick  # scripts/_quick.py

from hf_copa import CopaConfig, CopaModel
from hf_copa.conversion import URL_DOMAIN_CLASSIFIER_SIZES, URL_TRAINING_DOMAINS

# URL's DATASET_MODELS_RESNET18 (models/models_dict.py): the folder each source's network is saved in.
NETWORK_NAMES = {
    "ilsvrc_2012": "imagenet-net",
    "omniglot": "omniglot-net",
    "aircraft": "aircraft-net",
    "cu_birds": "birds-net",
    "dtd": "textures-net",
    "quickdraw": "quickdraw-net",
    "fungi": "fungi-net",
    "vgg_flower": "vgg_flower-net",
}
QUICK_DEFAULTS = {"width": 4}


def standin_checkpoint(source: str, width: int, seed: int) -> dict:
    """One sdl-layout checkpoint for `source`, with seeded random weights."""
    torch.manual_seed(seed)
    config = CopaConfig(embedding_size=width, hidden_sizes=[width, 2 * width, 4 * width, 8 * width])
    state = dict(CopaModel(config).state_dict())
    classes = URL_DOMAIN_CLASSIFIER_SIZES[URL_TRAINING_DOMAINS.index(source)]
    classifier = torch.nn.Linear(8 * width, classes)
    state["cls_fn.weight"], state["cls_fn.bias"] = classifier.weight.detach(), classifier.bias.detach()
    args = {"model.name": NETWORK_NAMES[source], "model.backbone": "resnet18", "data.train": [source]}
    return {"epoch": 0, "args": args, "state_dict": state, "best_val_acc": 0.0, "best_val_loss": 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", default="runs/sdl-standins", help="folder for <name>-net/model_best.pth.tar"
    )
    parser.add_argument("--width", type=int, default=8, help="the first stage's width W (URL's: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write what was written here")
    add_quick_flag(parser, "width 4")
    args = parse_quick(parser, argv, QUICK_DEFAULTS)
    written = {}
    for index, source in enumerate(URL_TRAINING_DOMAINS):
        path = Path(args.output) / NETWORK_NAMES[source] / "model_best.pth.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(standin_checkpoint(source, args.width, args.seed * 100 + index), path)
        written[source] = {"path": str(path), "bytes": path.stat().st_size}
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, trained on {source})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        summary = {"quick": args.quick, "width": args.width, "feature_dim": 8 * args.width, "files": written}
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
