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

Two settings (`SETTINGS`, `--setting`): `all-sources` (the default, the CoPA paper's first table: the backbone
was trained on the eight seen sources) and `imagenet-only` (its second table: trained on ImageNet alone).
The official scripts switch with `--test.mode sdl`, whose only effect is `trainsets = ['ilsvrc_2012']`
(URL's `test_extractor_pa.py` l. 37-42 and `test_extractor_tsa.py` l. 42-47; CoPA's `copa_pa.py` and
`copa_tsa.py` l. 32-35): ImageNet is the one seen source, so `url` and `tsa` take their `seen` rates there
only and the `unseen` ones on the other twelve; CoPA's choices are by dataset name and do not change;
`proto-maml(-all)` take `maml_init_with_proto_imagenet.gin` (preset `imagenet`); Finetune's ImageNet gin
equals the all-sources one in these fields.
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
SETTINGS = ("all-sources", "imagenet-only")
_SEEN_IN = {"all-sources": SEEN_SOURCES, "imagenet-only": ("ilsvrc_2012",)}
_HIGH_LR = ("mnist", "traffic_sign")
_HIGH_LR_WD = ("cifar10", "cifar100")


def check_setting(setting: str) -> str:
    if setting not in SETTINGS:
        raise CopaValueError(f"Unknown benchmark setting {setting!r}; choose one of {', '.join(SETTINGS)}.")
    return setting


def role(source: str, setting: str = "all-sources") -> str | None:
    """ "seen" or "unseen" for a Meta-Dataset source under `setting`, None for any other name."""
    if source not in SOURCES:
        return None
    return "seen" if source in _SEEN_IN[check_setting(setting)] else "unseen"


def paper_settings(
    source: str, protocol: str = "meta-dataset", setting: str = "all-sources"
) -> dict[str, dict[str, Any]]:
    """Method -> the overrides (a preset) the papers use on `source` under `protocol` and `setting`; {} for
    other names."""
    seen = role(source, setting)
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
        "proto-maml": {"preset": "all" if setting == "all-sources" else "imagenet"},
        "proto-maml-all": {"preset": "all" if setting == "all-sources" else "imagenet"},
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
