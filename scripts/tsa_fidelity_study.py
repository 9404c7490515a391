"""How close can any float32 run of TSA / CoPA+TSA get to the official outputs? A round-off study.

For each reference case (tsa seen/unseen, copa+tsa default/high-lr, episodes 0 and 1) it runs:

- hf_copa's learner in float32, as the reference was made (2 threads, channels-last input);
- the same with round-off perturbed: 1 thread; the input computed in float64 then rounded (1 ulp off in
  ~64% of the pixels); and the plain transcription of the official loop (`tests.support.official`);
- hf_copa's learner in float64, and the transcription in float64 (the official algorithm's exact answer).

It reports |logits - reference| for each, the spread among the float32 runs (how far round-off alone moves
the result), and for CoPA+TSA the per-step loss differences. Where the spread exceeds the 1e-3 target, no
float32 implementation can be held to it; where float32 runs agree with each other, they must also agree
with the reference.

    python scripts/tsa_fidelity_study.py --json runs/tsa_fidelity.json     # ~20 min, 2 cores
    python scripts/tsa_fidelity_study.py --quick --json out.json          # a smoke test: about a minute
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _quick import add_quick_flag, parse_quick  # scripts/_quick.py

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the transcription is in tests/support: run from anywhere, no PYTHONPATH

from hf_copa import CopaModel, get_learner  # noqa: E402
from hf_copa.conversion import load_url_backbone  # noqa: E402
from tests.support.official import official_copa_tsa, official_tsa  # noqa: E402

REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"
CASES = {  # (method, reference name) -> (preset, official hyperparameters)
    ("tsa", "seen"): ("seen", {"lr": 0.05, "lr_beta": 0.1}),
    ("tsa", "unseen"): ("unseen", {"lr": 0.5, "lr_beta": 1.0}),
    ("copa+tsa", "default"): ("default", {"lr": 1e-3, "adapter_lr_scale": 0.1, "weight_decay": 0.1}),
    ("copa+tsa", "highlr"): ("high-lr", {"lr": 5e-3, "adapter_lr_scale": 0.5, "weight_decay": 0.0}),
}
# --quick: one case of each method on episode 0, 1 adaptation step instead of 40 (compared with the
# reference's first loss; the logits are far from the reference's), every run at 1 thread.
QUICK_CASES = [("tsa", "seen"), ("copa+tsa", "default")]
QUICK_STEPS = 1
QUICK_DEFAULTS = {"episodes": [0]}


def load_backbone(reference_dir: Path) -> CopaModel:
    """The reference checkpoint's backbone with the stem padding the TSA references used (1)."""
    return load_url_backbone(reference_dir / "url_checkpoint.pth.tar.xz", stem_padding=1)


def pixels(uint8: np.ndarray, how: str) -> torch.Tensor:
    """2 * (x / 255 - 0.5) as NCHW (a channels-last view): in float32 as the reference, or via float64."""
    if how == "float64-rounded":
        return torch.from_numpy((2 * (uint8 / 255 - 0.5)).astype(np.float32)).permute(0, 3, 1, 2)
    return 2 * (torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 255 - 0.5)


def run(model, method, preset, official_hp, support, labels, query, transcription=False, steps=None):
    """(query logits [Q, C] as float64 numpy, per-step losses or None); `steps` overrides the 40 steps."""
    official_hp = official_hp if steps is None else {**official_hp, "steps": steps}
    if transcription:
        if method == "tsa":
            return official_tsa(model, support, labels, query, **official_hp).double().numpy(), None
        losses, logits = official_copa_tsa(model, support, labels, query, **official_hp)
        return logits.double().numpy(), losses
    overrides = {} if steps is None else {"steps": steps}
    head = get_learner(method, preset, **overrides).fit_images(model, support, labels)
    logits = head.logits(model.extract_features(query, **head.backbone_state()))
    return logits.double().numpy(), (np.array(head.train_losses) if method == "copa+tsa" else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference-dir", type=Path, default=REFERENCE_DIR)
    parser.add_argument("--episodes", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--json", type=Path, default=None)
    add_quick_flag(
        parser,
        "tsa seen and copa+tsa default on --episodes 0, 1 step, all at 1 thread",
    )
    args = parse_quick(parser, argv, QUICK_DEFAULTS)

    model32 = load_backbone(args.reference_dir)
    model64 = load_backbone(args.reference_dir).double()
    references = {
        "tsa": np.load(args.reference_dir / "tsa_adaptation.npz"),
        "copa+tsa": np.load(args.reference_dir / "copa_tsa_adaptation.npz"),
    }
    rows = []
    for (method, name), episode in itertools.product(QUICK_CASES if args.quick else CASES, args.episodes):
        preset, official_hp = CASES[(method, name)]
        ref = references[method]
        key = f"ep{episode}_{'tsa' if method == 'tsa' else 'copa_tsa'}_{name}"
        expected = ref[f"{key}_query_logits"].astype(np.float64)
        expected_losses = ref.get(f"{key}_train_losses")
        if args.quick and expected_losses is not None:
            expected_losses = expected_losses[:QUICK_STEPS]
        labels = torch.from_numpy(ref[f"ep{episode}_support_labels"])
        runs = {}
        steps = QUICK_STEPS if args.quick else None
        started = time.perf_counter()
        for label, threads, how, dtype, transcription in (
            ("float32 as the reference (2 threads)", 2, "float32", torch.float32, False),
            ("float32, 1 thread", 1, "float32", torch.float32, False),
            ("float32, input rounded from float64", 2, "float64-rounded", torch.float32, False),
            ("float32, official transcription", 2, "float32", torch.float32, True),
            ("float64", 2, "float32", torch.float64, False),
            ("float64, official transcription", 2, "float32", torch.float64, True),
        ):
            torch.set_num_threads(1 if args.quick else threads)
            support = pixels(ref[f"ep{episode}_support_uint8"], how).to(dtype)
            query = pixels(ref[f"ep{episode}_query_uint8"], how).to(dtype)
            model = model64 if dtype == torch.float64 else model32
            runs[label] = run(
                model, method, preset, official_hp, support, labels, query, transcription, steps
            )
        float32 = [logits for label, (logits, _) in runs.items() if label.startswith("float32")]
        row = {
            "method": method,
            "setting": name,
            "episode": episode,
            "seconds": round(time.perf_counter() - started, 1),
            "max_abs_logit_diff_to_reference": {
                label: float(np.abs(logits - expected).max()) for label, (logits, _) in runs.items()
            },
            "float32_spread": float(max(np.abs(a - b).max() for a, b in itertools.combinations(float32, 2))),
            "float64_vs_transcription": float(
                np.abs(runs["float64"][0] - runs["float64, official transcription"][0]).max()
            ),
        }
        if expected_losses is not None:
            row["max_rel_loss_diff_to_reference"] = {
                label: float((np.abs(losses - expected_losses) / expected_losses).max())
                for label, (_, losses) in runs.items()
            }
            ours = runs["float32 as the reference (2 threads)"][1]
            row["first_two_losses_rel_diff"] = [
                float(x) for x in (np.abs(ours - expected_losses) / expected_losses)[:2]
            ]
        rows.append(row)
        diffs = row["max_abs_logit_diff_to_reference"]
        ours = diffs["float32 as the reference (2 threads)"]
        print(
            f"{method:9s} {name:8s} ep{episode}  ours f32 {ours:.2e}  "
            f"f32 spread {row['float32_spread']:.2e}  f64 {diffs['float64']:.2e}  "
            f"f64 vs transcription {row['float64_vs_transcription']:.1e}  ({row['seconds']} s)",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {"torch": torch.__version__, **({"quick": True} if args.quick else {}), "rows": rows}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
