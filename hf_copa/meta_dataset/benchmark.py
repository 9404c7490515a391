"""The papers' Meta-Dataset benchmark: its 13 sources, which of them are seen, and the per-domain settings.

URL, TSA and CoPA report 600 test episodes on each of the 13 sources (Table 1 of the CoPA paper); the first
eight are the sources URL's backbone was trained on (seen), the other five are unseen. The official test
scripts pick some learning rates by dataset name; here those choices are one named set of presets
(`paper_settings`), applied by `hf-copa evaluate --paper-settings` (implied by `--benchmark meta-dataset`):

- `url` (URL's `test_extractor_pa.py` l. 56-60): lr 0.1 on seen sources (preset `seen`), 1.0 on unseen
  ones (`unseen`);
- `tsa` (URL's `test_extractor_tsa.py` l. 64-78, `alpha+beta` residual matrix adapters): `seen` (0.05 /
  0.1) and `unseen` (0.5 / 1.0);
- `copa` (CoPA's `models/adaptation.py` l. 95-101, linear heads): `high-lr` (lr 5e-3, no weight decay) on
  MNIST and Traffic Sign, the defaults elsewhere;
- `copa+tsa` (CoPA's `models/adaptation.py` l. 264-274): `high-lr` on MNIST and Traffic Sign, `high-lr-wd`
  on CIFAR-10 and CIFAR-100, the defaults elsewhere; with the 5-way 1-shot protocol (`test.type == '1shot'`)
  the learning rate is divided by 10 (the `*1-shot` presets);
- `copa-transformer` (CoPA's `models/adaptation.py` l. 65-82, `encoder.type == 'transformer'`): `high-lr`
  (lr 1e-3, no weight decay) on MNIST and Traffic Sign, the defaults elsewhere, under every protocol;
- `finetune`, `finetune-all`: `default`, Meta-Dataset's `learn/gin/best/baselinefinetune_all.gin` (the
  all-sources setting, equal in these fields to `baselinefinetune_imagenet.gin`), on every source;
- `proto-maml`, `proto-maml-all`: `all`, `learn/gin/best/maml_init_with_proto_all.gin`, on every source
  (`imagenet` is the ImageNet-only setting);
- `ncc` and `mahalanobis` have no hyperparameter to set (Simple CNAPS' classifier has none per dataset).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..conversion import URL_TRAINING_DOMAINS
from ..episodes import canonical_protocol
from ..validation import CopaValueError
from .specs import SPEC_FILENAME

SEEN_SOURCES = (
    URL_TRAINING_DOMAINS  # ilsvrc_2012, omniglot, aircraft, cu_birds, dtd, quickdraw, fungi, vgg_flower
)
UNSEEN_SOURCES = ("traffic_sign", "mscoco", "mnist", "cifar10", "cifar100")
SOURCES = (*SEEN_SOURCES, *UNSEEN_SOURCES)
_HIGH_LR = ("mnist", "traffic_sign")
_HIGH_LR_WD = ("cifar10", "cifar100")


def role(source: str) -> str | None:
    """ "seen" or "unseen" for a Meta-Dataset source, None for any other name."""
    return "seen" if source in SEEN_SOURCES else "unseen" if source in UNSEEN_SOURCES else None


def paper_settings(source: str, protocol: str = "meta-dataset") -> dict[str, dict[str, Any]]:
    """Method -> the overrides (a preset) the papers use on `source` under `protocol`; {} for other names."""
    seen = role(source)
    if seen is None:
        return {}
    copa_tsa = "high-lr" if source in _HIGH_LR else "high-lr-wd" if source in _HIGH_LR_WD else "default"
    if canonical_protocol(protocol) == "5-way-1-shot":
        copa_tsa = {"default": "1-shot", "high-lr": "high-lr-1-shot", "high-lr-wd": "high-lr-wd-1-shot"}[
            copa_tsa
        ]
    return {
        "url": {"preset": seen},
        "tsa": {"preset": seen},
        "copa": {"preset": "high-lr" if source in _HIGH_LR else "default"},
        "copa+tsa": {"preset": copa_tsa},
        "copa-transformer": {"preset": "high-lr" if source in _HIGH_LR else "default"},
        "finetune": {"preset": "default"},
        "finetune-all": {"preset": "default"},
        "proto-maml": {"preset": "all"},
        "proto-maml-all": {"preset": "all"},
    }


def find_sources(data_root: str | Path) -> tuple[dict[str, Path], list[str]]:
    """The converted sources under `data_root` (`<root>/<source>/` with its `dataset_spec.json`), in the
    benchmark's order, and the names of the sources that are missing."""
    root = Path(data_root)
    if not root.is_dir():
        raise CopaValueError(
            f"The data root {str(root)!r} is not a folder; give the OUTPUT folder of `hf-copa meta-dataset "
            "convert RECORDS OUTPUT`, which holds one folder per source."
        )
    found = {name: root / name for name in SOURCES if (root / name / SPEC_FILENAME).is_file()}
    return found, [name for name in SOURCES if name not in found]
