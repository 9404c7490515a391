"""The feature cache: features equal the model's own, the disk cache hits, misses and heals correctly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from hf_copa import CopaConfig, CopaImageProcessor, CopaModel
from hf_copa.features import (
    CorruptFeatureCacheWarning,
    default_cache_dir,
    extract_dataset_features,
    feature_cache_key,
    weights_fingerprint,
)

from .conftest import TINY_CONFIG, tiny_backbone

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_IMAGES = 20


def make_images(count: int, seed: int = 0) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        height, width = rng.integers(8, 24, size=2)
        if index % 2:
            images.append(PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
        else:
            images.append(PIL.Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L"))
    return images


def make_dataset(images: list[PIL.Image.Image]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict(
        {"image": images, "label": [i % 3 for i in range(len(images))]}, features=features
    )


@pytest.fixture
def model() -> CopaModel:
    return tiny_backbone()


@pytest.fixture(scope="module")
def dataset() -> datasets.Dataset:
    return make_dataset(make_images(NUM_IMAGES))


class ForwardCounter:
    """Counts backbone forward passes through a forward pre-hook."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        self.calls += 1


def reference_features(model: CopaModel, dataset: datasets.Dataset, **kwargs) -> torch.Tensor:
    return model.extract_features(list(dataset[:]["image"]), **kwargs)


def extract(model, dataset, **kwargs) -> torch.Tensor:
    return extract_dataset_features(model, dataset, progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------------
# Features


def test_features_equal_extract_features_row_by_row(model, dataset):
    features = extract(model, dataset, batch_size=6)  # several batches, a ragged last one
    assert features.shape == (NUM_IMAGES, model.feature_dim)
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    torch.testing.assert_close(features, reference_features(model, dataset), atol=1e-5, rtol=0)
    assert not features.is_inference(), "learners need ordinary tensors they can use with autograd"


def test_worker_processes_give_the_same_features(model, dataset):
    in_process = extract(model, dataset, batch_size=8)
    with_workers = extract(model, dataset, batch_size=8, num_workers=2)
    torch.testing.assert_close(with_workers, in_process, atol=1e-6, rtol=0)


def test_real_mnist_rows(model, datasets_dir):
    mnist = datasets.load_dataset(str(datasets_dir / "mnist"))["test"].select(range(64))
    features = extract(model, mnist, batch_size=24)
    assert features.shape == (64, model.feature_dim)
    torch.testing.assert_close(features, reference_features(model, mnist), atol=1e-5, rtol=0)


def test_custom_image_processor_is_used(model, dataset):
    processor = CopaImageProcessor(size={"height": 40, "width": 40})
    features = extract(model, dataset, image_processor=processor)
    reference = reference_features(model, dataset, image_processor=processor)
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(features, extract(model, dataset), atol=1e-4)


def test_other_image_column(model, dataset):
    renamed = dataset.rename_column("image", "picture")
    torch.testing.assert_close(
        extract(model, renamed, image_column="picture"), extract(model, dataset), atol=0, rtol=0
    )


def test_dataset_transform_is_ignored(model, dataset):
    def blank(batch):
        return {"image": [PIL.Image.new("RGB", (5, 5)) for _ in batch["image"]]}

    with pytest.warns(UserWarning, match="transform is ignored"):
        transformed = extract(model, dataset.with_transform(blank))
    torch.testing.assert_close(transformed, extract(model, dataset), atol=0, rtol=0)


def test_eval_mode_and_training_flag_restored(model, dataset):
    reference = reference_features(model, dataset)  # BatchNorm in eval mode
    state_before = {name: value.clone() for name, value in model.state_dict().items()}
    model.train()
    features = extract(model, dataset)
    assert model.training and all(module.training for module in model.modules())
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)
    for name, value in model.state_dict().items():  # running statistics not updated
        assert torch.equal(value, state_before[name]), name

    model.eval()
    extract(model, dataset)
    assert not model.training


def test_progress_bar(model, dataset, capsys):
    extract_dataset_features(model, dataset, progress=True)
    assert "Extracting features" in capsys.readouterr().err
    extract_dataset_features(model, dataset, progress=False)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------------
# The disk cache


def test_cache_hit_skips_the_backbone(model, dataset, tmp_path):
    counter = ForwardCounter(model)
    first = extract(model, dataset, cache_dir=tmp_path, batch_size=8)
    assert counter.calls == 3
    second = extract(model, dataset, cache_dir=tmp_path, batch_size=8)
    assert counter.calls == 3, "a cache hit must not run the backbone"
    assert torch.equal(first, second)
    # An equal model built separately (same weights) shares the entry.
    twin = tiny_backbone()
    twin_counter = ForwardCounter(twin)
    assert torch.equal(extract(twin, dataset, cache_dir=tmp_path), first)
    assert twin_counter.calls == 0
    assert not any(path.name.endswith(".tmp") for path in tmp_path.iterdir())


def test_cache_description_names_the_key_parts(model, dataset, tmp_path):
    extract(model, dataset, cache_dir=tmp_path)
    key = feature_cache_key(model, dataset)
    assert (tmp_path / f"{key}.safetensors").is_file()
    description = json.loads((tmp_path / f"{key}.json").read_text())
    parts = description["parts"]
    assert (description["rows"], description["dim"]) == (NUM_IMAGES, model.feature_dim)
    assert parts["dataset"] == {
        "fingerprint": dataset._fingerprint,
        "num_rows": NUM_IMAGES,
        "image_column": "image",
    }
    assert parts["model"]["weights"] == weights_fingerprint(model)
    assert parts["image_processor"]["size"] == {"height": 32, "width": 32}
    assert parts["autocast_dtype"] is None


def _changed_weights(model: CopaModel, dataset: datasets.Dataset) -> dict:
    with torch.no_grad():
        model.layer3[0].conv2.weight.mul_(1.5)
    return {}


def _changed_batch_norm_statistics(model: CopaModel, dataset: datasets.Dataset) -> dict:
    with torch.no_grad():
        model.layer4[1].bn2.running_var.add_(0.25)
    return {}


def _changed_processor(model: CopaModel, dataset: datasets.Dataset) -> dict:
    return {"image_processor": CopaImageProcessor(size={"height": 32, "width": 32}, resample=0)}


def _changed_dataset(model: CopaModel, dataset: datasets.Dataset) -> dict:
    images = make_images(NUM_IMAGES)
    images[7] = PIL.Image.new("RGB", (12, 12), "white")
    return {"dataset": make_dataset(images)}


@pytest.mark.parametrize(
    "change", [_changed_weights, _changed_batch_norm_statistics, _changed_processor, _changed_dataset]
)
def test_cache_miss_when_an_input_changes(model, dataset, tmp_path, change):
    before = extract(model, dataset, cache_dir=tmp_path)
    overrides = change(model, dataset)
    changed_dataset = overrides.pop("dataset", dataset)
    assert changed_dataset._fingerprint is not None
    counter = ForwardCounter(model)
    after = extract(model, changed_dataset, cache_dir=tmp_path, **overrides)
    assert counter.calls > 0, "a changed input must recompute the features"
    assert not torch.allclose(after, before, atol=1e-5)
    expected = reference_features(model, changed_dataset, image_processor=overrides.get("image_processor"))
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_cache_miss_for_a_subset_and_another_column(model, dataset, tmp_path):
    extract(model, dataset, cache_dir=tmp_path)
    subset = dataset.select(range(5))
    counter = ForwardCounter(model)
    torch.testing.assert_close(
        extract(model, subset, cache_dir=tmp_path), reference_features(model, subset), atol=1e-5, rtol=0
    )
    assert counter.calls > 0
    images = make_images(3)
    columns = datasets.Features({"image": datasets.Image(), "copy": datasets.Image()})
    both = datasets.Dataset.from_dict({"image": images, "copy": images}, features=columns)
    assert feature_cache_key(model, both, image_column="copy") != feature_cache_key(model, both)


def test_weights_fingerprint():
    assert weights_fingerprint(tiny_backbone(seed=0)) == weights_fingerprint(tiny_backbone(seed=0))
    assert weights_fingerprint(tiny_backbone(seed=0)) != weights_fingerprint(tiny_backbone(seed=1))
    assert weights_fingerprint(tiny_backbone()) != weights_fingerprint(tiny_backbone().double())
    wider = CopaModel(CopaConfig(**{**TINY_CONFIG, "hidden_sizes": [8, 8, 16, 24]}))
    assert weights_fingerprint(wider) != weights_fingerprint(tiny_backbone())


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00not a safetensors file" * 10)


def _flip_a_feature_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the feature matrix: header and shape still valid
    path.write_bytes(bytes(data))


def _wrong_shape(path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file({"features": torch.zeros(3, 16)}, str(path), metadata=metadata)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _flip_a_feature_byte, _wrong_shape])
def test_corrupt_cache_entry_is_recomputed_with_a_warning(model, dataset, tmp_path, damage):
    expected = extract(model, dataset, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.safetensors")
    damage(entry)
    counter = ForwardCounter(model)
    with pytest.warns(CorruptFeatureCacheWarning, match="Recomputing"):
        recomputed = extract(model, dataset, cache_dir=tmp_path)
    assert counter.calls > 0
    torch.testing.assert_close(recomputed, expected, atol=0, rtol=0)
    with warnings.catch_warnings():  # the entry was rewritten and is whole again
        warnings.simplefilter("error")
        assert torch.equal(extract(model, dataset, cache_dir=tmp_path), expected)
    assert counter.calls == 1


def test_interrupted_write_leaves_no_entry(model, dataset, tmp_path, monkeypatch):
    def interrupted_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        extract(model, dataset, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.tmp"))
    monkeypatch.undo()
    counter = ForwardCounter(model)
    extract(model, dataset, cache_dir=tmp_path)
    assert counter.calls > 0 and len(list(tmp_path.glob("*.safetensors"))) == 1


def test_unwritable_cache_dir_warns_and_still_returns_features(model, dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="Could not write the feature cache"):
        features = extract(model, dataset, cache_dir=blocker / "cache")
    assert features.shape == (NUM_IMAGES, model.feature_dim)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_COPA_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("HF_COPA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "hf_copa" / "features"


# ------------------------------------------------------------------------------------------------------
# Errors


def test_missing_image_column_names_the_columns(model, dataset):
    with pytest.raises(ValueError, match=r"no column 'img'.*\['image', 'label'\]"):
        extract(model, dataset, image_column="img")


def test_empty_dataset(model, dataset):
    with pytest.raises(ValueError, match="empty"):
        extract(model, dataset.select([]))


def test_model_without_extract_features(dataset):
    with pytest.raises(TypeError, match="extract_features"):
        extract(torch.nn.Linear(3, 3), dataset)


def test_dataset_dict_and_bad_arguments(model, dataset):
    with pytest.raises(TypeError, match=r"pass one split, e.g. dataset\['test'\]"):
        extract(model, datasets.DatasetDict({"test": dataset}))
    with pytest.raises(TypeError, match="datasets.Dataset"):
        extract(model, list(dataset))
    with pytest.raises(ValueError, match="batch_size"):
        extract(model, dataset, batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        extract(model, dataset, num_workers=-1)


def test_unreadable_image_names_the_rows(model):
    broken = datasets.Dataset.from_dict({"image": ["/nonexistent/a.png", "/nonexistent/b.png"]})
    with pytest.raises(ValueError, match=r"rows 0\.\.1 of column 'image'.*does not exist"):
        extract(model, broken)


# ------------------------------------------------------------------------------------------------------
# Only the rows a run needs


class ImageCounter:
    """Counts the images the backbone embeds (the batch sizes of its forward passes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.images = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        self.images += len(args[0])


def test_row_features_embed_only_the_requested_rows_and_match_the_full_split(model, dataset):
    from hf_copa.features import extract_row_features

    counter = ImageCounter(model)
    rows = [17, 3, 3, 9]
    part = extract_row_features(model, dataset, rows, progress=False)
    counter.handle.remove()
    assert counter.images == 3 and part.rows.tolist() == [3, 9, 17]
    full = extract(model, dataset)
    torch.testing.assert_close(part[[9, 3, 17]], full[[9, 3, 17]], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="No features were extracted for dataset rows \\[4\\]"):
        part[[3, 4]]
    with pytest.raises(ValueError, match="outside the split"):
        extract_row_features(model, dataset, [0, NUM_IMAGES], progress=False)


def test_a_later_run_asking_for_more_rows_embeds_only_the_new_ones(model, dataset, tmp_path):
    from hf_copa.features import extract_row_features

    first = ImageCounter(model)
    extract_row_features(model, dataset, [1, 2, 3], cache_dir=tmp_path, progress=False)
    first.handle.remove()
    second = ImageCounter(model)
    more = extract_row_features(model, dataset, [2, 3, 4, 5], cache_dir=tmp_path, progress=False)
    second.handle.remove()
    again = ImageCounter(model)
    cached = extract_row_features(model, dataset, [1, 5], cache_dir=tmp_path, progress=False)
    again.handle.remove()
    assert (first.images, second.images, again.images) == (3, 2, 0)
    full = extract(model, dataset)
    torch.testing.assert_close(more.features, full[[2, 3, 4, 5]], rtol=0, atol=1e-6)
    torch.testing.assert_close(cached.features, full[[1, 5]], rtol=0, atol=1e-6)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # one entry per model, processor and dataset


def test_cache_files_get_the_users_permissions(model, dataset, tmp_path):
    import os
    import stat

    extract(model, dataset, cache_dir=tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
