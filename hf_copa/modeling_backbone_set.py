"""`CopaBackboneSet`: several frozen backbones as one feature extractor, features [N, B, d] (SUR, URT).

SUR and URT combine eight single-domain ResNet-18s (URL's `sdl` networks, or SUR's own) instead of one
multi-domain network. A set holds B backbones (`CopaModel`s, or any family's), in a fixed order with a name
each (the source a member was trained on), and gives each image's B feature vectors stacked: [N, B, d]. It is
a thin composite, not a `PreTrainedModel` of its own: each member stays a complete backbone that
`hf_copa.load_model` loads alone, and the set is a manifest beside them. A set folder (or Hub repo) holds

- `backbone_set.json`: the members in order, each `{"name", "path"}` (bundled: its folder inside the set)
  or `{"name", "repo_id", "revision"}` (referenced: a Hub model at a pinned commit);
- `backbones/<index>-<name>/`: the bundled members, each a `save_pretrained` folder;
- `README.md`: the card.

Features are extracted one member at a time: a batch goes through the first backbone, its pooled features
are kept and the activations freed, then the next backbone runs (one backbone's activations at a time, never
B). `hf_copa.features` caches each member's features under that member's own key, so a member shared by
two sets, or used alone, is embedded once per image.

A set is identified by its members' names and weight fingerprints (`identity`): an adapted head and a
trained URT layer record it, and using them with another set is refused with the difference named.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import write_text_atomically
from .frozen import frozen_backbone
from .learners.base import FEATURES
from .modeling_backbone import FEATURE_BATCH_SIZE, FewShotBackbone
from .pretrained import load_model
from .quiet import quiet_transformers
from .validation import CopaTypeError, CopaValueError

SET_FILE = "backbone_set.json"
SET_FORMAT_VERSION = 1
MEMBERS_FOLDER = "backbones"
# Image processor settings that must agree across members (the others, like the class, do not change pixels).
_PROCESSOR_KEYS_IGNORED = frozenset({"_processor_class", "image_processor_type", "processor_class"})

__all__ = ["CopaBackboneSet", "is_backbone_set_folder"]


def is_backbone_set_folder(path: str | Path) -> bool:
    """Whether `path` is a local folder written by `CopaBackboneSet.save_pretrained`."""
    return (Path(path) / SET_FILE).is_file()


class CopaBackboneSet(nn.Module):
    """B frozen `CopaModel`s giving features [N, B, d], in the order given (SUR / URT concatenate or weigh
    them in that order). Members must share the feature size and the image processor (one image, B views).

    Build one from loaded models (`CopaBackboneSet({"ilsvrc_2012": model, ...})`), or load one with
    `from_pretrained(folder_or_hub_id, revision=...)`; `save_pretrained(folder, bundle=True)` writes the
    members' weights into the folder, `bundle=False` only their Hub ids and commits.
    """

    offers = frozenset({FEATURES})  # its members' pooled features, stacked [N, B, d]
    family_name = "backbone set"

    def __init__(
        self,
        backbones: Mapping[str, FewShotBackbone] | Sequence[tuple[str, FewShotBackbone]],
        name_or_path: str | None = None,
        revision: str | None = None,
    ) -> None:
        super().__init__()
        pairs = list(backbones.items()) if isinstance(backbones, Mapping) else list(backbones)
        if len(pairs) < 2:
            raise CopaValueError(
                f"A backbone set needs at least two backbones, got {len(pairs)}; with one, use it alone."
            )
        names = [name for name, _ in pairs]
        for name, model in pairs:
            if not isinstance(name, str) or not name or "/" in name:
                raise CopaValueError(f"Backbone names must be non-empty strings without '/', got {name!r}.")
            if not isinstance(model, FewShotBackbone):
                raise CopaTypeError(
                    f"Backbone {name!r} is a {type(model).__name__}; a set holds backbones "
                    "(hf_copa.load_model(...), CopaModel.from_pretrained(...))."
                )
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise CopaValueError(f"Backbone names must be unique; {repeated} appear more than once.")
        dims = {name: model.feature_dim for name, model in pairs}
        if len(set(dims.values())) > 1:
            raise CopaValueError(
                f"The backbones give features of different sizes ({dims}); a set stacks them [N, B, d], so "
                "every member must give the same d."
            )
        processors = {name: _processor_settings(model) for name, model in pairs}
        first_name, first = next(iter(processors.items()))
        differing = [name for name, settings in processors.items() if settings != first]
        if differing:
            raise CopaValueError(
                f"The backbones {differing} prepare images differently from {first_name!r} (their image "
                "processors differ); a set embeds one image through every member, so they must agree."
            )
        self.names = names
        self.members = nn.ModuleList([model for _, model in pairs])
        self.name_or_path = name_or_path
        self.revision = revision

    # --- shape and identity ------------------------------------------------------------------------------

    @property
    def num_backbones(self) -> int:
        return len(self.members)

    @property
    def feature_dim(self) -> int:
        return self.members[0].feature_dim

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def backbone(self, name: str) -> FewShotBackbone:
        """The member called `name`."""
        if name not in self.names:
            raise CopaValueError(f"This set has no backbone {name!r}; it has {self.names}.")
        return self.members[self.names.index(name)]

    def feature_members(self) -> list[tuple[str, FewShotBackbone]]:
        """(name, model) in feature order: what `hf_copa.features` extracts and caches one by one."""
        return list(zip(self.names, self.members, strict=True))

    def identity(self) -> dict[str, list[str]]:
        """The members' names and weight fingerprints, in order: what heads and URT layers pin."""
        from .features import weights_fingerprint

        return {"backbones": list(self.names), "fingerprints": [weights_fingerprint(m) for m in self.members]}

    def check_identity(self, recorded: Mapping[str, Any], what: str) -> None:
        """Refuse `what` (a head, a URT layer) fitted on another set, naming how the sets differ."""
        names = list(recorded.get("backbones") or [])
        prints = list(recorded.get("fingerprints") or [])
        mine = self.identity()
        if names == mine["backbones"] and prints == mine["fingerprints"]:
            return
        if names != mine["backbones"]:
            difference = f"it was fitted on backbones {names}, this set holds {mine['backbones']}"
        else:
            changed = [n for n, a, b in zip(names, prints, mine["fingerprints"], strict=True) if a != b]
            difference = f"the weights of {changed} differ from those it was fitted on"
        raise CopaValueError(
            f"{what} does not match this backbone set: {difference}. Use it with the set it was fitted on "
            "(its record names it), or fit it again on this one."
        )

    # --- features -----------------------------------------------------------------------------------------

    def default_image_processor(self) -> Any:
        return self.members[0].default_image_processor()

    def to_pixel_values(self, images: Any, image_processor: Any = None) -> torch.Tensor:
        return self.members[0].to_pixel_values(images, image_processor)

    def extract_features(
        self, images: Any, image_processor: Any = None, batch_size: int = FEATURE_BATCH_SIZE, **options: Any
    ) -> torch.Tensor:
        """Features [N, B, d] of images (anything `CopaModel.extract_features` takes), member by member."""
        if options.get("spatial"):
            raise CopaValueError(
                "A backbone set gives pooled features [N, B, d] only; feature maps come from one backbone "
                "(set.backbone(name).extract_features(images, spatial=True))."
            )
        unknown = sorted(set(options) - {"spatial"})
        if unknown:
            raise CopaTypeError(f"A backbone set's extract_features takes no {unknown}.")
        pixel_values = self.to_pixel_values(images, image_processor)
        with frozen_backbone(self):
            parts = [member.extract_features(pixel_values, batch_size=batch_size) for member in self.members]
        return torch.stack(parts, dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.extract_features(pixel_values)

    # --- adapted heads ------------------------------------------------------------------------------------

    def adapt(
        self,
        support_images: Any,
        support_labels: Any,
        method: str = "sur",
        preset: str | None = None,
        image_processor: Any = None,
        **hyperparameters: Any,
    ):
        """Adapt a several-backbone method (`sur`, `urt`) to a support set of images; the head records this
        set. `support_labels` are integers 0..C-1 (use `hf_copa.class_order` for other labels)."""
        from .learners import get_learner

        learner = get_learner(method, preset=preset, **hyperparameters)
        learner.check_model(self)
        head = learner.fit(self.extract_features(support_images, image_processor), support_labels)
        head.backbone_set = self.identity()
        return head

    def logits(self, head: Any, images: Any, image_processor: Any = None) -> torch.Tensor:
        """[N, C] logits of a several-backbone head for images, after checking it was fitted on this set."""
        recorded = getattr(head, "backbone_set", None)
        if recorded is None or getattr(head, "feature_kind", None) != "backbones":
            raise CopaValueError(
                "This head was not adapted on a backbone set (it scores one backbone); score it with "
                "the CopaModel it was adapted on."
            )
        self.check_identity(recorded, "The head")
        return head.logits(self.extract_features(images, image_processor).to(head.prototypes))

    def save_head(self, head: Any, labels: Sequence[Any], folder: str | Path) -> Path:
        """Write a head adapted on this set as an artifact (`hf_copa.heads`) naming the set as its base."""
        from . import heads

        recorded = getattr(head, "backbone_set", None) or self.identity()
        self.check_identity(recorded, "The head")
        head.backbone_set = recorded
        base = heads.BaseModelReference(
            str(Path(self.name_or_path).resolve())
            if self.name_or_path and Path(self.name_or_path).exists()
            else self.name_or_path,
            self.revision,
        )
        return heads.write_artifact(
            folder, head, labels, self.members[0].config, self.default_image_processor(), base
        )

    def load_head(self, folder: str | Path) -> tuple[Any, list[Any]]:
        """(head, labels) of an artifact `save_head` wrote, refused with a clear error if it was fitted on
        another set."""
        from . import heads

        artifact = heads.read_artifact(heads.locate_artifact(folder))
        recorded = getattr(artifact.head, "backbone_set", None)
        if recorded is None:
            raise CopaValueError(
                f"{str(folder)!r} holds a head of one backbone ({artifact.base_model.name_or_path!r}), "
                "not on a backbone set; load it with CopaForFewShotClassification.from_pretrained."
            )
        self.check_identity(recorded, f"The head in {str(folder)!r}")
        return artifact.head, artifact.labels

    # --- saving and loading -------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, bundle: bool = True) -> Path:
        """Write the set: the members' weights (`bundle=True`) or their Hub ids and commits (`bundle=False`,
        for members loaded from the Hub)."""
        folder = Path(folder)
        entries = []
        for index, (name, member) in enumerate(self.feature_members()):
            if bundle:
                relative = f"{MEMBERS_FOLDER}/{index}-{name}"
                with quiet_transformers():
                    member.save_pretrained(folder / relative)
                    member.default_image_processor().save_pretrained(folder / relative)
                entries.append({"name": name, "path": relative})
                continue
            source = getattr(member.config, "_name_or_path", "") or ""
            revision = getattr(member, "hub_revision", None)
            if not source or Path(source).exists() or ":" in source or revision is None:
                raise CopaValueError(
                    f"Backbone {name!r} was not loaded from the Hub at a known commit (it came from "
                    f"{source or 'nowhere'!r}), so a set cannot reference it; save with bundle=True."
                )
            entries.append({"name": name, "repo_id": source, "revision": revision})
        manifest = {
            "format_version": SET_FORMAT_VERSION,
            "feature_dim": self.feature_dim,
            "backbones": entries,
            "fingerprints": self.identity()["fingerprints"],
        }
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(folder / SET_FILE, json.dumps(manifest, indent=2) + "\n")
        write_text_atomically(folder / "README.md", self._card(entries, bundle))
        return folder

    def push_to_hub(
        self,
        repo_id: str,
        bundle: bool = True,
        token: str | bool | None = None,
        private: bool | None = None,
        commit_message: str = "Upload CoPA backbone set",
    ):
        """Create the repo if needed and upload the set in one commit (see `save_pretrained`)."""
        from .heads import push_artifact

        return push_artifact(
            repo_id,
            lambda folder, _repo: self.save_pretrained(folder, bundle=bundle),
            token=token,
            private=private,
            commit_message=commit_message,
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        revision: str | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
    ) -> CopaBackboneSet:
        """A set from a folder `save_pretrained` wrote, or from a Hub repo (at `revision`)."""
        folder, resolved = _locate_set(name_or_path, revision, local_files_only, token, cache_dir)
        manifest = _read_manifest(folder / SET_FILE)
        members = []
        for entry in manifest["backbones"]:
            if "path" in entry:
                member_folder = folder / entry["path"]
                if not member_folder.is_dir():
                    raise CopaValueError(
                        f"The backbone set {str(name_or_path)!r} lists {entry['name']!r} at {entry['path']!r}"
                        ", which it does not hold; re-save or re-download the whole set."
                    )
                model = load_model(member_folder)
            else:
                model = load_model(
                    entry["repo_id"],
                    revision=entry["revision"],
                    local_files_only=local_files_only,
                    token=token,
                    cache_dir=cache_dir,
                )
            members.append((entry["name"], model.eval()))
        backbone_set = cls(members, name_or_path=str(name_or_path), revision=resolved)
        recorded = manifest.get("fingerprints")
        if recorded is not None:
            backbone_set.check_identity(
                {"backbones": [e["name"] for e in manifest["backbones"]], "fingerprints": recorded},
                f"The set's record ({SET_FILE})",
            )
        return backbone_set.eval()

    def _card(self, entries: list[dict[str, str]], bundle: bool) -> str:
        rows = "\n".join(
            f"| {i} | `{e['name']}` | "
            + (f"bundled (`{e['path']}`)" if bundle else f"`{e['repo_id']}` @ `{e['revision'][:12]}`")
            + " |"
            for i, e in enumerate(entries)
        )
        return (
            "---\nlibrary_name: hf_copa\ntags:\n- hf_copa\n- few-shot\n- backbone-set\n---\n\n"
            f"# A set of {self.num_backbones} CoPA backbones\n\n"
            f"Features [N, {self.num_backbones}, {self.feature_dim}] for several-backbone few-shot methods "
            "(SUR, URT), in this order:\n\n| # | name | weights |\n| --- | --- | --- |\n"
            f"{rows}\n\nLoad with `hf_copa.CopaBackboneSet.from_pretrained(...)`.\n"
        )


def _processor_settings(model: FewShotBackbone) -> dict[str, Any]:
    settings = model.default_image_processor().to_dict()
    return {k: v for k, v in settings.items() if k not in _PROCESSOR_KEYS_IGNORED}


def _locate_set(
    name_or_path: str | Path,
    revision: str | None,
    local_files_only: bool,
    token: str | bool | None,
    cache_dir: str | Path | None,
) -> tuple[Path, str | None]:
    """The local folder of a set, and the Hub commit it came from (None for a local folder)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / SET_FILE).is_file():
            raise CopaValueError(
                f"{str(name_or_path)!r} holds no backbone set: it has no {SET_FILE}. Write one with "
                "`hf-copa bundle` or CopaBackboneSet.save_pretrained."
            )
        return path, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        snapshot = Path(
            snapshot_download(
                str(name_or_path),
                revision=revision,
                local_files_only=local_files_only,
                token=token,
                cache_dir=cache_dir,
            )
        )
    except HFValidationError as err:
        raise CopaValueError(
            f"{str(name_or_path)!r} is neither a local folder nor a Hub repo id: {err}"
        ) from None
    except RepositoryNotFoundError:
        raise CopaValueError(
            f"{str(name_or_path)!r} is not a local folder, and no Hub repo of that name was found (or it is "
            "private: pass token=)."
        ) from None
    except RevisionNotFoundError:
        raise CopaValueError(f"The Hub repo {str(name_or_path)!r} has no revision {revision!r}.") from None
    if not (snapshot / SET_FILE).is_file():
        raise CopaValueError(f"The Hub repo {str(name_or_path)!r} holds no backbone set (no {SET_FILE}).")
    return snapshot, snapshot.name


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CopaValueError(f"{str(path)!r} is damaged: it is not valid JSON ({err}).") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and version > SET_FORMAT_VERSION:
        raise CopaValueError(
            f"{str(path)!r} is a backbone set of format {version}, newer than hf_copa reads; upgrade hf_copa."
        )
    entries = manifest.get("backbones") if isinstance(manifest, dict) else None
    valid = isinstance(entries, list) and all(
        isinstance(e, dict)
        and isinstance(e.get("name"), str)
        and (
            isinstance(e.get("path"), str)
            or (isinstance(e.get("repo_id"), str) and isinstance(e.get("revision"), str))
        )
        for e in entries
    )
    if not valid:
        raise CopaValueError(
            f"{str(path)!r} is damaged: its 'backbones' must list {{name, path}} or"
            " {{name, repo_id, revision}} entries. Re-save or re-download the set."
        )
    return manifest
