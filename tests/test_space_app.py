"""The Space (spaces/copa-few-shot): its logic (hf_copa.interactive), and the app itself, started with
`python spaces/copa-few-shot/app.py` on 127.0.0.1 and driven with gradio_client on real images: results,
bad inputs, the Hub push, and the lifetime of a session's uploads (kept for reruns, deleted when the session
ends or idles, never another session's)."""

from __future__ import annotations

import base64
import importlib
import importlib.util
import io
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

import hf_copa
from hf_copa.interactive import (
    SessionUploads,
    TaskError,
    TaskLimits,
    build_task,
    embedding_views,
    example_tasks,
    load_image,
)
from hf_copa.learners import one_backbone_methods
from hf_copa.learners.base import methods_for
from hf_copa.pretrained import load_model
from tests.support.local_hub import LocalHub

from .conftest import REPO_ROOT, SHARED_DIR, TINY_CONFIG, unavailable

APP = REPO_ROOT / "spaces" / "copa-few-shot" / "app.py"
STARTUP_LIMIT_S = 240  # only bounds a hung start; a healthy one takes seconds
CLASSES = ("airplane", "cat", "ship")  # CIFAR-10 test images: real photos
SHOTS, QUERIES_PER_CLASS = 4, 2
IDLE_SECONDS = 8  # the idle time of the second app process, which tests that rule
SESSION_END_LIMIT_S = 30  # only bounds a wait; unload fires within a heartbeat (0.5 s here) of a close

pytestmark = pytest.mark.usefixtures("single_thread")


def require_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        unavailable(f"{name} is not installed: pip install -e '.[dev]'")


# --- the app as a process -------------------------------------------------------------------------------


@dataclass
class RunningSpace:
    url: str
    upload_dir: Path
    log: list[str]

    def holds(self, paths) -> list[Path]:
        """The copies of these files that gradio's upload cache still holds (uploads keep their file name)."""
        names = {Path(path).name for path in paths}
        found = []
        for folder, _, files in os.walk(
            self.upload_dir
        ):  # (a folder the server deletes meanwhile is skipped)
            found += [Path(folder) / name for name in files if name in names]
        return [path for path in found if path.is_file()]

    def copies(self, paths) -> list[Path]:
        """The server's copy of each of these files (one each: gradio names an upload by its content)."""
        found = {p.name: p for p in self.holds(paths)}
        assert len(found) == len(self.holds(paths)) and set(found) == {Path(p).name for p in paths}
        return [found[Path(p).name] for p in paths]

    def wait_until_gone(self, paths, limit_s: float = SESSION_END_LIMIT_S) -> float:
        """Seconds until the server holds none of these files (fails after `limit_s`)."""
        start = time.monotonic()
        while self.holds(paths):
            assert time.monotonic() - start < limit_s, f"still on the server: {self.holds(paths)}"
            time.sleep(0.1)
        return time.monotonic() - start


class SpaceProcess:
    """`python spaces/copa-few-shot/app.py`, run from another folder with its uploads under `workdir`.

    Starting returns at once (the app imports torch and gradio meanwhile); `serving()` waits for its URL.
    """

    def __init__(self, workdir: Path, env: dict[str, str] | None = None, idle_seconds: float | None = None):
        self.upload_dir = workdir / "gradio-uploads"
        env = dict(os.environ if env is None else env)
        env.pop("MODEL_ID", None)
        env.pop("GRADIO_SERVER_NAME", None)  # the default must be 127.0.0.1
        env.pop("COPA_SPACE_IDLE_SECONDS", None)  # the default (1 hour), unless set here
        if idle_seconds is not None:
            env["COPA_SPACE_IDLE_SECONDS"] = str(idle_seconds)
        env.update(
            GRADIO_TEMP_DIR=str(self.upload_dir),
            GRADIO_ANALYTICS_ENABLED="False",
            GRADIO_HEARTBEAT_INTERVAL="0.5",  # a closed client is noticed within 0.5 s (default 15 s)
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        )
        self.process = subprocess.Popen(
            [sys.executable, str(APP)],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.log: list[str] = []
        self._started: queue.Queue[str | None] = queue.Queue()
        self._running: RunningSpace | None = None
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:  # read the whole output, so a chatty server never blocks on a full pipe
        for line in self.process.stdout:
            self.log.append(line)
            if "Running on local URL:" in line:
                self._started.put(line.split("URL:", 1)[1].strip().rstrip("/"))
        self._started.put(None)

    def serving(self) -> RunningSpace:
        if self._running is None:
            try:
                url = self._started.get(timeout=STARTUP_LIMIT_S)
            except queue.Empty:
                url = None
            if url is None:
                pytest.fail("The Space did not start:\n" + "".join(self.log))
            self._running = RunningSpace(url, self.upload_dir, self.log)
        return self._running

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- fixtures -------------------------------------------------------------------------------------------


@dataclass
class ImageTask:
    support: dict[str, list[Path]]
    queries: list[Path]


@pytest.fixture(scope="module")
def real_task(tmp_path_factory) -> ImageTask:
    """CIFAR-10 test photos: 4 support (PNG) and 2 query (JPEG) images of each of 3 classes."""
    source = SHARED_DIR / "datasets" / "cifar10"
    if not source.is_dir():
        unavailable(f"the shared datasets are not at {source.parent} (set HF_COPA_SHARED)")
    datasets = require_module("datasets")
    split = datasets.load_dataset(str(source), split="test")
    names = split.features["label"].names
    labels = np.asarray(split["label"])
    folder = tmp_path_factory.mktemp("cifar10")
    support, queries = {}, []
    for name in CLASSES:
        rows = np.flatnonzero(labels == names.index(name))[: SHOTS + QUERIES_PER_CLASS]
        support[name] = []
        for k, row in enumerate(rows):
            image = split[int(row)]["image"]
            if k < SHOTS:
                support[name].append(folder / f"{name}_{k}.png")
                image.save(support[name][-1])
            else:
                queries.append(folder / f"query_{name}_{k}.jpg")
                image.save(queries[-1], quality=95)
    return ImageTask(support, queries)


_SHARED: dict[str, tuple[SpaceProcess, LocalHub]] = {}


def shared_space(request, tmp_path_factory) -> tuple[SpaceProcess, LocalHub]:
    """One app process (and the local Hub it pushes to) for the whole session: both Space test modules use
    it, so it starts once. Stopped when the session ends."""
    if "space" not in _SHARED:
        if importlib.util.find_spec("gradio") is None:  # (not imported here: the app process imports it)
            unavailable("gradio is not installed: pip install -e '.[dev]'")
        stack = ExitStack()
        request.session.config.add_cleanup(stack.close)  # at the end of the session, whoever asked first
        hub = stack.enter_context(LocalHub(tmp_path_factory.mktemp("hub")))
        workdir = tmp_path_factory.mktemp("space")
        process = SpaceProcess(workdir, hub.client_env(workdir / "hf-home"))
        stack.callback(process.stop)
        stack.callback(_SHARED.clear)
        _SHARED["space"] = (process, hub)
    return _SHARED["space"]


@pytest.fixture(scope="module", autouse=True)
def start_the_space_early(request, tmp_path_factory) -> None:
    """Start the app before the in-process tests, so that its start-up overlaps them."""
    if importlib.util.find_spec("gradio") is not None:
        shared_space(request, tmp_path_factory)


@pytest.fixture(scope="session")
def space(request, tmp_path_factory) -> RunningSpace:
    return shared_space(request, tmp_path_factory)[0].serving()


@pytest.fixture(scope="session")
def hub(request, tmp_path_factory) -> LocalHub:
    return shared_space(request, tmp_path_factory)[1]


def new_client(space: RunningSpace):
    """A gradio_client session of its own (its own state and uploads, ended by `close()`)."""
    gradio_client = require_module("gradio_client")
    return gradio_client.Client(space.url, verbose=False, download_files=False)


@pytest.fixture
def client(space):
    """A fresh gradio_client session per test, ended (its uploads deleted) after it."""
    client = new_client(space)
    yield client
    client.close()


@pytest.fixture(scope="module")
def idle_space(tmp_path_factory):
    """A second app process whose sessions' uploads are deleted after IDLE_SECONDS without a request."""
    process = SpaceProcess(tmp_path_factory.mktemp("idle-space"), idle_seconds=IDLE_SECONDS)
    yield process.serving()
    process.stop()


@pytest.fixture(scope="module")
def model():
    return load_model()


def gallery(paths) -> list[dict]:
    """Local files, which gradio_client uploads."""
    from gradio_client import handle_file

    return [{"image": handle_file(str(path)), "caption": None} for path in paths]


def server_gallery(paths) -> list[dict]:
    """Files already on the server, as the page sends a gallery's images back: gradio_client uploads only
    file objects marked with its "meta", so these are sent as they are, not uploaded again."""
    return [{"image": {"path": str(path)}, "caption": None} for path in paths]


def unique_images(folder: Path, count: int, seed: int, prefix: str = "img") -> list[Path]:
    """Images whose content no other test uploads (the server shares one file per content)."""
    generator = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = generator.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        paths.append(folder / f"{prefix}_{seed}_{index}.png")
        PIL.Image.fromarray(pixels).save(paths[-1])
    return paths


GALLERIES = (*(f"class_{i}_images" for i in range(1, 6)), "query_images")
OUTPUTS = ("status", "html", "plot", "json", *GALLERIES)
UNCHANGED = {"__type__": "update"}  # gr.skip(): the gallery keeps what it shows


def classify(
    client, classes: list[tuple[str, list[Path]]], queries: list[Path], method: str = "copa", as_files=gallery
) -> dict:
    """Call the app's /classify endpoint by parameter name; the outputs by name."""
    arguments = {}
    for index in range(1, 6):
        name, paths = classes[index - 1] if index <= len(classes) else ("", [])
        arguments[f"class_{index}_name"] = name
        arguments[f"class_{index}_images"] = as_files(paths)
    outputs = client.predict(**arguments, query_images=as_files(queries), method=method, api_name="/classify")
    return dict(zip(OUTPUTS, outputs, strict=True))


def on_server(space: RunningSpace, classes, queries) -> tuple[list, list]:
    """The same task, named by the server's copies of its files."""
    return [(name, space.copies(paths)) for name, paths in classes], space.copies(queries)


def decoded_plot(plot: dict) -> PIL.Image.Image:
    assert plot["type"] == "matplotlib"
    header, data = plot["plot"].split(",", 1)
    assert header == "data:image/png;base64"
    return PIL.Image.open(io.BytesIO(base64.b64decode(data)))


# --- the Space's files ----------------------------------------------------------------------------------


def test_space_card_and_requirements_match_the_package():
    """The front matter Spaces reads, and a requirements file that installs hf_copa with its demo extra."""
    import tomllib

    from huggingface_hub import SpaceCard
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    card = SpaceCard.load(APP.parent / "README.md").data
    assert card.sdk == "gradio" and (APP.parent / card.app_file).resolve() == APP
    gradio_spec = next(
        Requirement(r) for r in project["optional-dependencies"]["demo"] if r.startswith("gradio")
    )
    assert Version(card.sdk_version) in gradio_spec.specifier
    assert card.python_version == "3.11" and Version(card.python_version) in SpecifierSet(
        project["requires-python"]
    )
    assert card.license == project["license"].lower() and card.models and card.short_description
    assert len(card.short_description) <= 60  # the Hub's limit

    lines = (APP.parent / "requirements.txt").read_text().splitlines()
    requirements = [Requirement(line) for line in lines if line.strip() and not line.startswith(("#", "-"))]
    package = next(r for r in requirements if r.name == project["name"])
    assert package.extras == {"demo"} and package.specifier.contains(hf_copa.__version__)
    torch = next(r for r in requirements if r.name == "torch")
    torch_spec = next(Requirement(r) for r in project["dependencies"] if r.startswith("torch")).specifier
    assert all(torch_spec.contains(spec.version) for spec in torch.specifier)


# --- hf_copa.interactive: the logic, in process ---------------------------------------------------------


@pytest.mark.parametrize("method", ["copa", "url", "ncc"])
def test_the_after_view_is_what_the_classifier_compares(method):
    """The plotted 'after' embeddings are the head's own maps: their scaled cosines are the logits."""
    generator = torch.Generator().manual_seed(0)
    support = torch.rand(12, 16, generator=generator)
    labels = torch.arange(3).repeat(4)
    queries = torch.rand(5, 16, generator=generator)
    head = hf_copa.adapt(support, labels, method=method)
    before, after = embedding_views(head, support, queries, labels)
    logits = head.scale * torch.from_numpy(after.queries @ after.prototypes.T).float()
    torch.testing.assert_close(logits, head.logits(queries), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.from_numpy(before.prototypes), torch.nn.functional.normalize(head.prototypes.double(), dim=-1)
    )
    if method == "ncc":
        np.testing.assert_array_equal(after.support, before.support)
        assert after.gap == before.gap
    else:
        assert after.gap != pytest.approx(before.gap)


@pytest.mark.parametrize("method", one_backbone_methods())
def test_a_request_embeds_each_image_at_most_twice(method):
    """run_task goes through adapt_to_task once: feature learners embed each image once (the views reuse the
    features), backbone learners once plain (the "before" view) and once adapted (logits, "after" view).
    Learners that fine-tune the layers themselves (`*-all`) also run the support set through the backbone
    at each of their steps and once after the last (fo-Proto-MAML also once before the first, for its
    prototype initialisation), which is their training, not re-embedding."""
    from hf_copa.interactive import Task, run_task

    backbone = hf_copa.CopaModel(hf_copa.CopaConfig(**TINY_CONFIG)).eval()
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(9)]
    task = Task(images[:6], ["a", "b", "c"] * 2, images[6:], ["q0", "q1", "q2"])
    embedded, depth = [], [0]

    def enter(module, args):  # forward(weights=...) re-enters forward: count the outer call only
        depth[0] += 1
        if depth[0] == 1:
            embedded.append(len(args[0]))

    def leave(module, args, output):
        depth[0] -= 1

    hooks = [backbone.register_forward_pre_hook(enter), backbone.register_forward_hook(leave)]
    steps = 2 if "steps" in hf_copa.ADAPTATION_DEFAULTS[method] else None
    try:
        result = run_task(backbone, task, method, **({} if steps is None else {"steps": steps}))
    finally:
        for hook in hooks:
            hook.remove()
    plain = len(task.support_images) + len(task.query_images)
    expected = plain
    if hf_copa.get_learner(method).needs_backbone:
        expected += len(task.query_images)
    if result.classifier.head.backbone_weights:  # each step, after the last, and proto-maml's init
        expected += (steps + 1 + (method == "proto-maml-all")) * len(task.support_images)
    assert sum(embedded) == expected
    assert result.probabilities.shape == (3, 3)


@pytest.mark.parametrize("method", ["tsa", "copa+tsa"])
def test_the_after_view_of_a_tsa_head_uses_its_adapted_backbone(method):
    """Before: the plain backbone's features and their class means. After: the adapted backbone's features
    through the head's maps, whose scaled cosines are the classifier's logits."""
    torch.manual_seed(0)
    backbone = hf_copa.CopaModel(hf_copa.CopaConfig(**TINY_CONFIG)).eval()
    generator = torch.Generator().manual_seed(1)
    support_pixels, query_pixels = (torch.rand(n, 3, 32, 32, generator=generator) * 2 - 1 for n in (9, 4))
    labels = torch.arange(3).repeat(3)
    head = hf_copa.get_learner(method, steps=3).fit_images(backbone, support_pixels, labels)
    plain_support, plain_queries = (backbone.extract_features(x) for x in (support_pixels, query_pixels))
    adapted_support, adapted_queries = (
        backbone.extract_features(x, adapters=head.adapters) for x in (support_pixels, query_pixels)
    )
    before, after = embedding_views(
        head, plain_support, plain_queries, labels, adapted_support, adapted_queries
    )
    means = torch.stack([plain_support[labels == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(before.prototypes, F.normalize(means.double(), dim=-1).numpy(), atol=1e-6)
    np.testing.assert_allclose(before.queries, F.normalize(plain_queries.double(), dim=-1).numpy(), atol=1e-6)
    logits = head.scale * torch.from_numpy(after.queries @ after.prototypes.T).float()
    torch.testing.assert_close(logits, head.logits(adapted_queries), atol=1e-5, rtol=1e-5)
    assert "adapters" in after.title
    with pytest.raises(ValueError, match="adapted backbone"):
        embedding_views(head, plain_support, plain_queries, labels)


def png(path: Path, size=(8, 8), colour=(200, 30, 30)) -> Path:
    PIL.Image.new("RGB", size, colour).save(path)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("class without images", "Class 'b' has no images"),
        ("images without a name", "Class 2 has 1 image(s) but no name"),
        ("one class", "at least 2 classes"),
        ("same name twice", "Classes 'A' and 'a' have the same name"),
        ("no query", "at least one query image"),
        ("too many in a class", "Class 'a' has 3 images; the limit is 2"),
        ("too many in all", "5 support images given; the limit is 4"),
        ("too many queries", "4 query images given; the limit is 3"),
        ("file too big", "is 1.5 KB; the limit is 1 KB"),
        ("image too wide", "is 50x8 pixels; the limit is 40"),
        ("not an image", "'notes.png' (class 'a') is not an image file that can be read"),
        ("truncated image", "'cut.png' (class 'a') is a damaged or unsupported image"),
        ("deleted upload", "no longer on the server"),
    ],
)
def test_build_task_says_what_is_wrong(tmp_path, case, message):
    limits = TaskLimits(max_images_per_class=2, max_support_images=4, max_query_images=3, max_image_side=40)
    a, b, q = png(tmp_path / "a.png"), png(tmp_path / "b.png", colour=(0, 0, 200)), png(tmp_path / "q.png")
    classes, queries = [("a", [a]), ("b", [b])], [q]
    if case == "class without images":
        classes[1] = ("b", [])
    elif case == "images without a name":
        classes[1] = ("  ", [b])
    elif case == "one class":
        classes = [("a", [a]), (None, None)]
    elif case == "same name twice":
        classes = [("A", [a]), ("a ", [b])]
    elif case == "no query":
        queries = []
    elif case == "too many in a class":
        classes[0] = ("a", [a, a, a])
    elif case == "too many in all":
        classes = [("a", [a, a]), ("b", [b, b]), ("c", [a])]
    elif case == "too many queries":
        queries = [q] * 4
    elif case == "file too big":
        (tmp_path / "big.png").write_bytes(a.read_bytes() + bytes(1536 - a.stat().st_size))
        classes[1] = ("b", [tmp_path / "big.png"])
        limits = TaskLimits(max_file_bytes=1024)
    elif case == "image too wide":
        classes[0] = ("a", [png(tmp_path / "wide.png", size=(50, 8))])
    elif case == "not an image":
        (tmp_path / "notes.png").write_text("not an image")
        classes[0] = ("a", [tmp_path / "notes.png"])
    elif case == "truncated image":
        noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        PIL.Image.fromarray(noise).save(tmp_path / "whole.png")
        (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:1500])
        classes[0] = ("a", [tmp_path / "cut.png"])
    elif case == "deleted upload":
        queries = [tmp_path / "gone.png"]
    with pytest.raises(TaskError) as caught:
        build_task(classes, queries, limits)
    assert message in str(caught.value)
    assert build_task([("a", [a]), ("b", [b])], [q], limits).class_names == [
        "a",
        "b",
    ]  # the valid task passes


def test_images_are_read_into_memory_as_rgb_and_large_ones_shrunk(tmp_path):
    path = tmp_path / "wide.png"
    PIL.Image.new("L", (1500, 300), 90).save(path)
    image = load_image(path, "a test")
    path.unlink()  # the image no longer depends on the (deleted) upload
    assert image.mode == "RGB" and image.size == (1024, 205)
    assert np.asarray(image).shape == (205, 1024, 3) and np.all(np.asarray(image) == 90)


def test_every_bundled_example_is_a_valid_task_of_real_images():
    tasks = example_tasks()
    assert {"quickdraw", "fashion_mnist", "mnist", "omniglot"} <= set(tasks)
    for task in tasks.values():
        loaded = build_task(task.classes, task.queries)
        assert len(loaded.class_names) >= 3 and len(loaded.query_images) >= 6
        for path in [p for _, paths in task.classes for p in paths] + task.queries:
            assert path.stat().st_size < 8_000  # a few KB each


# --- the app module, in process -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_module(tmp_path_factory):
    require_module("gradio")
    spec = importlib.util.spec_from_file_location("copa_space_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_queue_is_on_and_one_adaptation_runs_at_a_time(app_module):
    demo = app_module.demo
    classify_fn = next(fn for fn in demo.fns.values() if fn.api_name == "classify")
    assert classify_fn.queue and classify_fn.concurrency_limit == 1
    assert demo._queue.max_size is not None  # a full queue tells users so instead of growing without bound
    assert app_module.LIMITS.max_file_bytes == TaskLimits().max_file_bytes  # also passed to launch()


@dataclass
class FakeRequest:  # what the handlers read of gr.Request
    session_hash: str


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def uploaded_files(root: Path, count: int, seed: int) -> list[Path]:
    """Files laid out as gradio stores uploads: one folder per file under the upload folder."""
    paths = []
    for index, path in enumerate(unique_images(root / "staging", count, seed)):
        folder = root / f"{seed}-{index}"
        folder.mkdir(parents=True)
        paths.append(path.rename(folder / path.name))
    (root / "staging").rmdir()
    return paths


def test_a_session_holds_only_uploads_and_ending_it_deletes_them(tmp_path):
    root = tmp_path / "uploads"
    mine = uploaded_files(root, 2, seed=1)
    example = next(iter(example_tasks().values())).queries[0]
    (root / "example").mkdir()
    cached_example = root / "example" / example.name  # gradio's cached copy of a bundled example
    cached_example.write_bytes(example.read_bytes())
    outside = png(tmp_path / "elsewhere.png")
    uploads = SessionUploads(root, 3600, keep=[example])
    uploads.touch("a", [*mine, cached_example, outside, root, root / "missing.png"])
    assert uploads.holds("a") == {path.resolve() for path in mine}
    uploads.touch(None, [outside])  # no session (not a request): nothing held
    assert uploads.sessions == ["a"]
    assert sorted(uploads.end("a")) == sorted(path.resolve() for path in mine)
    assert not any(path.exists() for path in mine) and not any(path.parent.exists() for path in mine)
    assert cached_example.exists() and outside.exists() and root.is_dir()
    assert uploads.end("a") == [] and uploads.sessions == []


def test_a_file_two_sessions_hold_goes_when_the_last_one_ends(tmp_path):
    root = tmp_path / "uploads"
    shared, only_a, only_b = uploaded_files(root, 3, seed=2)
    uploads = SessionUploads(root, 3600)
    uploads.touch("a", [shared, only_a])
    uploads.touch("b", [shared, only_b])
    assert uploads.end("a") == [only_a.resolve()]
    assert shared.exists() and only_b.exists() and not only_a.exists()
    assert sorted(uploads.end("b")) == sorted([shared.resolve(), only_b.resolve()])
    assert not shared.exists() and not only_b.exists()


def test_the_idle_rule_ends_a_session_after_its_last_request_and_drops_unheld_uploads(tmp_path):
    root = tmp_path / "uploads"
    held, orphan, fresh_orphan = uploaded_files(root, 3, seed=3)
    clock = Clock()
    os.utime(orphan, (clock.now - 5, clock.now - 5))  # written 5 s before the others
    uploads = SessionUploads(root, 10, clock=clock)
    uploads.touch("a", [held])
    everything = [held, orphan, fresh_orphan]
    clock.now += 9
    assert uploads.sweep(everything) == [orphan.resolve()]  # 14 s old; the session is 9 s idle
    assert held.exists() and fresh_orphan.exists()
    uploads.touch("a")  # a request without files restarts the idle clock too
    clock.now += 9.5
    assert uploads.sweep(everything) == [fresh_orphan.resolve()]  # 18.5 s old
    assert uploads.sessions == ["a"] and held.exists()
    clock.now += 0.5  # 10 s after the session's last request
    assert uploads.sweep(everything) == [held.resolve()]
    assert uploads.sessions == [] and not held.exists()


def test_closing_deletes_every_upload(tmp_path):
    root = tmp_path / "uploads"
    held, orphan = uploaded_files(root, 2, seed=4)
    uploads = SessionUploads(root, 3600)
    uploads.touch("a", [held])
    assert sorted(uploads.close([orphan])) == sorted([held.resolve(), orphan.resolve()])
    assert uploads.sessions == [] and not held.exists() and not orphan.exists()


def test_the_rule_is_stated_the_same_in_the_page_and_the_readme(app_module):
    from hf_copa.interactive import duration

    assert [duration(x) for x in (3600, 5400, 60, 1, 0.5, 2)] == [
        "1 hour",
        "1.5 hours",
        "1 minute",
        "1 second",
        "0.5 seconds",
        "2 seconds",
    ]
    rule = app_module.UPLOADS.describe()
    assert app_module.UPLOADS.idle_seconds == 3600 and "once 1 hour passes without a request" in rule
    assert rule in app_module.intro(app_module.UPLOADS)
    readme = " ".join((APP.parent / "README.md").read_text().split())
    assert rule in readme
    for old_promise in ("deleted from the server when a run ends", "when the run ends", "in seconds"):
        assert old_promise not in readme and old_promise not in rule
    with pytest.raises(ValueError, match="positive"):
        SessionUploads(APP.parent, 0)


def handlers(app_module, root: Path) -> tuple[SessionUploads, object]:
    uploads = SessionUploads(root, 3600, keep=app_module.EXAMPLE_FILES)
    return uploads, app_module.classify_fn(uploads)


def test_a_server_error_is_a_message_and_the_session_keeps_its_uploads(
    app_module, tmp_path, monkeypatch, caplog
):
    uploads, classify_handler = handlers(app_module, tmp_path / "uploads")
    files = uploaded_files(tmp_path / "uploads", 3, seed=5)

    def broken(*args, **kwargs):
        raise RuntimeError("an internal detail")

    monkeypatch.setattr(app_module, "run_task", broken)
    empty_slots = ["", None] * 3
    out = classify_handler(
        "a",
        [(str(files[0]), None)],
        "b",
        [(str(files[1]), None)],
        *empty_slots,
        [(str(files[2]), None)],
        "copa",
        FakeRequest("s1"),
    )
    assert out[0].startswith("⚠️ Something went wrong on the server") and "internal detail" not in out[0]
    assert out[1:5] == ("", None, None, None)  # no stale results, no head to push
    assert "classification failed" in caplog.text and "internal detail" in caplog.text  # logged for us
    assert all(path.exists() for path in files) and uploads.holds("s1") == {p.resolve() for p in files}
    assert out[5:] == (app_module.gr.skip(),) * 6  # every gallery keeps its images, for another run


def test_a_gallery_whose_files_have_gone_is_emptied(app_module, tmp_path):
    uploads, classify_handler = handlers(app_module, tmp_path / "uploads")
    a, b, q = uploaded_files(tmp_path / "uploads", 3, seed=6)
    q.unlink()  # e.g. deleted by the idle rule while the page stayed open
    empty_slots = ["", None] * 3
    out = classify_handler(
        "a", [(str(a), None)], "b", [(str(b), None)], *empty_slots, [(str(q), None)], "ncc", FakeRequest("s1")
    )
    assert (
        out[0].startswith("⚠️ The file")
        and "no longer on the server" in out[0]
        and "upload it again" in out[0]
    )
    assert out[5:] == (app_module.gr.skip(),) * 5 + (None,)


def test_load_example_fills_every_slot(app_module):
    values = app_module.load_example("fashion_mnist")
    names, galleries = values[0:10:2], values[1:10:2]
    assert names == ("ankle boot", "bag", "sneaker", "trouser", "")
    assert [len(g) for g in galleries[:4]] == [5, 5, 5, 5] and galleries[4] is None
    assert len(values[10]) == 8 and all(Path(p).is_file() for p in values[10])


# --- the app served on 127.0.0.1, driven with gradio_client ----------------------------------------------


def test_the_page_is_served_on_localhost(space):
    import httpx

    assert space.url.startswith("http://127.0.0.1:")
    page = httpx.get(space.url + "/", timeout=30)
    assert page.status_code == 200 and "CoPA few-shot classification" in page.text
    config = httpx.get(space.url + "/config", timeout=30).json()
    assert config["enable_queue"] is True


# What the Space (on the default, EfficientNet-Lite0) offers: every one-backbone method but the two that need
# ResNet's residual adapters; run_task's own tests above run those on a ResNet.
SPACE_METHODS = methods_for(hf_copa.EfficientNetLiteModel)


def test_the_page_offers_the_methods_its_backbone_serves(space, model):
    import httpx

    config = httpx.get(space.url + "/config", timeout=30).json()
    radios = [c["props"] for c in config["components"] if c.get("type") == "radio"]
    offered = [[choice[1] for choice in r["choices"]] for r in radios if r.get("label") == "Method"]
    assert offered == [methods_for(model)] and methods_for(model) == SPACE_METHODS
    assert "tsa" not in SPACE_METHODS and {"copa", "url", "ncc"} <= set(SPACE_METHODS)


@pytest.mark.parametrize("method", SPACE_METHODS)
def test_classifies_real_images(client, space, real_task, model, method):
    classes = list(real_task.support.items())
    out = classify(client, classes, real_task.queries, method)

    result = out["json"]
    assert result["method"] == method and result["classes"] == sorted(CLASSES)
    assert result["hyperparameters"] == model.config.adaptation_hyperparameters(method)
    predictions = result["predictions"]
    assert [p["image"] for p in predictions] == [q.name for q in real_task.queries]
    for prediction in predictions:
        probabilities = prediction["probabilities"]
        assert set(probabilities) == set(CLASSES)
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert prediction["label"] == max(probabilities, key=probabilities.get)
    # The numbers are the package's own: adapting here on the same files gives the same probabilities.
    paths = [p for _, ps in classes for p in ps]
    labels = [name for name, ps in classes for _ in ps]
    adapted = model.adapt(paths, labels, method=method)
    expected = adapted.predict(real_task.queries)
    for got, want in zip(predictions, expected, strict=True):
        for item in want:
            assert got["probabilities"][item["label"]] == pytest.approx(item["score"], abs=1e-4)

    assert math.isfinite(result["gap_before"]) and math.isfinite(result["gap_after"])
    # Proto-MAML's layer starts as the prototypes (W = 2 mu): where its support loss is already 0 (the
    # default's well-separated ImageNet features saturate the softmax) its gradient steps move nothing.
    nothing_to_learn = method.startswith("proto-maml") and max(adapted.head.train_losses) == 0
    if method in ("ncc", "mahalanobis") or nothing_to_learn:  # the class means stay the prototypes
        assert result["gap_after"] == pytest.approx(result["gap_before"], abs=1e-6)
    else:
        assert result["gap_after"] != pytest.approx(result["gap_before"])
    assert f"**{method}** adapted to **3 classes** from 12 support images in" in out["status"]
    assert f"{result['gap_before']:.3f}** before" in out["status"]
    assert out["html"].count('class="copa-card"') == len(real_task.queries)
    assert out["html"].count("<img") == len(real_task.queries) + len(paths)  # queries and support, inline
    for query in real_task.queries:
        assert query.name in out["html"]
    figure = decoded_plot(out["plot"])
    assert figure.width > figure.height > 300

    # The session keeps its uploads for another run: on the server, and in the galleries (left as they are).
    assert len(space.copies(paths + real_task.queries)) == len(paths) + len(real_task.queries)
    assert "deleted" not in out["status"]
    assert [out[name] for name in GALLERIES] == [UNCHANGED] * len(GALLERIES)


def test_bundled_examples_run_and_stay_available(client, space):
    task = example_tasks()["quickdraw"]
    classes, queries = [(name, paths[:2]) for name, paths in task.classes], task.queries[:2]
    out = classify(client, classes, queries, "ncc")
    assert len(out["json"]["predictions"]) == len(queries)
    examples = [p for _, paths in classes for p in paths] + queries
    assert len(space.holds(examples)) == len(examples)
    assert all(out[name] == UNCHANGED for name in GALLERIES)  # galleries left as they are
    client.close()  # the session ends: the examples stay, as other sessions share these copies
    time.sleep(2)  # (unload fires within a heartbeat, 0.5 s here)
    assert len(space.holds(examples)) == len(examples)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("class without images", "Class 'ship' has no images"),
        ("images without a name", "Class 2 has 1 image(s) but no name"),
        ("unreadable file", "'broken.png' (class 'airplane') is not an image file that can be read"),
        ("single class", "Name at least 2 classes"),
        ("no query", "Upload at least one query image"),
        ("image too large", "pixels a side"),
    ],
)
def test_bad_inputs_give_a_message_not_a_traceback(client, space, real_task, tmp_path, case, message):
    classes = [(name, paths[:1]) for name, paths in real_task.support.items()]  # small: fewer uploads
    queries = real_task.queries[:1]
    if case == "class without images":
        classes[2] = ("ship", [])
    elif case == "images without a name":
        classes[1] = ("", classes[1][1])
    elif case == "unreadable file":
        (tmp_path / "broken.png").write_bytes(b"this is text, not a PNG")
        classes[0][1].append(tmp_path / "broken.png")
    elif case == "single class":
        classes = classes[:1]
    elif case == "no query":
        queries = []
    elif case == "image too large":
        queries.append(png(tmp_path / "panorama.png", size=(TaskLimits().max_image_side + 1, 2)))
    out = classify(client, classes, queries)
    assert out["status"].startswith("⚠️") and message in out["status"]
    assert "Traceback" not in out["status"]
    assert out["json"] is None and out["html"] == "" and out["plot"] is None
    uploaded = [p for _, paths in classes for p in paths] + queries
    assert len(space.copies(uploaded)) == len(uploaded)  # kept for the session, to fix the task and rerun
    assert [out[name] for name in GALLERIES] == [UNCHANGED] * len(GALLERIES)
    assert not any("Traceback" in line for line in space.log)  # a user's mistake is not a server error


def test_push_to_hub_with_the_users_token(client, space, hub, real_task, model, tmp_path):
    from huggingface_hub import HfApi, snapshot_download

    from hf_copa import CopaForFewShotClassification

    assert "Classify first" in client.predict("test-user/copa-head", hub.token, api_name="/push")
    classes = [(name, paths[:2]) for name, paths in real_task.support.items()]
    queries = real_task.queries[:3]
    out = classify(client, classes, queries)
    # The server's own HF_TOKEN (set here) is never used: a wrong or missing user token is refused.
    assert "token was rejected" in client.predict("test-user/copa-head", "hf_wrong", api_name="/push")
    assert "Hugging Face token" in client.predict("test-user/copa-head", "", api_name="/push")
    assert "not a valid repository id" in client.predict("no spaces allowed", hub.token, api_name="/push")
    message = client.predict("test-user/copa-head", hub.token, api_name="/push")
    assert message.startswith("✅ Pushed") and hub.token not in message

    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    assert {"config.json", "head.safetensors", "README.md"} <= set(api.list_repo_files("test-user/copa-head"))
    folder = snapshot_download("test-user/copa-head", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    head_config = json.loads((Path(folder) / "config.json").read_text())["copa_head"]
    assert head_config["method"] == "copa" and head_config["labels"] == sorted(CLASSES)
    pushed = CopaForFewShotClassification.from_pretrained(folder, base_model=model)
    for got, want in zip(out["json"]["predictions"], pushed.predict(queries), strict=True):
        for item in want:
            assert got["probabilities"][item["label"]] == pytest.approx(item["score"], abs=1e-5)


# --- the lifetime of a session's uploads, on the served app ----------------------------------------------


def test_a_second_run_with_another_method_needs_no_new_upload(client, space, real_task, tmp_path):
    """After a run the uploads stay on the server: a rerun names them there (as the page does), with
    another method, after the local files are gone, so nothing can have been uploaded again."""
    local = {name: [tmp_path / p.name for p in paths] for name, paths in real_task.support.items()}
    for name, paths in real_task.support.items():
        for source, copy in zip(paths, local[name], strict=True):
            copy.write_bytes(source.read_bytes())
    queries = [tmp_path / p.name for p in real_task.queries[:3]]
    for source, copy in zip(real_task.queries, queries, strict=False):
        copy.write_bytes(source.read_bytes())
    classes = list(local.items())
    first = classify(client, classes, queries, "copa")
    assert first["json"]["method"] == "copa"
    server_classes, server_queries = on_server(space, classes, queries)
    for path in [*queries, *(p for _, ps in classes for p in ps)]:
        path.unlink()
    second = classify(client, server_classes, server_queries, "url", as_files=server_gallery)
    assert second["status"].startswith("**url** adapted to **3 classes** from 12 support images")
    assert [p["image"] for p in second["json"]["predictions"]] == [q.name for q in queries]
    assert [second[name] for name in GALLERIES] == [UNCHANGED] * len(GALLERIES)


def test_after_a_validation_error_the_uploads_are_there_to_fix_the_task(client, space, tmp_path):
    classes = [("red", unique_images(tmp_path, 2, seed=11)), ("", unique_images(tmp_path, 2, seed=12))]
    queries = unique_images(tmp_path, 1, seed=13)
    out = classify(client, classes, queries)
    assert out["status"] == "⚠️ Class 2 has 2 image(s) but no name: type a name for it."
    assert [out[name] for name in GALLERIES] == [UNCHANGED] * len(GALLERIES)
    server_classes, server_queries = on_server(space, classes, queries)  # still on the server
    server_classes[1] = ("blue", server_classes[1][1])  # the user types the missing name, and reruns
    fixed = classify(client, server_classes, server_queries, "ncc", as_files=server_gallery)
    assert fixed["json"]["classes"] == ["blue", "red"] and len(fixed["json"]["predictions"]) == 1


def test_ending_a_session_deletes_its_uploads_and_no_other_sessions(space, tmp_path):
    """Two sessions, each with images of its own and one image both uploaded (the server keeps one file
    for both). When one ends, its own images go; the other's, and the shared one, stay until it ends."""
    shared = unique_images(tmp_path, 1, seed=21, prefix="shared")
    own = {"a": unique_images(tmp_path, 3, seed=22), "b": unique_images(tmp_path, 3, seed=23)}
    clients = {key: new_client(space) for key in own}
    try:
        for key, client in clients.items():
            classes = [("x", [shared[0], own[key][0]]), ("y", [own[key][1]])]
            out = classify(client, classes, [own[key][2]], "ncc")
            assert out["json"]["classes"] == ["x", "y"], out["status"]
        server_b = space.copies([*shared, *own["b"]])
        assert len(space.copies([*shared, *own["a"], *own["b"]])) == 7
        clients["a"].close()  # the page is closed: unload
        took = space.wait_until_gone(own["a"])
        assert len(space.copies([*shared, *own["b"]])) == 4, f"b's images went with a's ({took:.1f} s)"
        out = classify(
            clients["b"],
            [("x", server_b[:2]), ("y", server_b[2:3])],
            server_b[3:],
            "url",
            as_files=server_gallery,
        )
        assert out["json"]["method"] == "url" and len(out["json"]["predictions"]) == 1
    finally:
        for client in clients.values():
            client.close()
    space.wait_until_gone([*shared, *own["b"]])
    # A new session starts empty: the page it loads shows no one's images.
    import httpx

    config = httpx.get(space.url + "/config", timeout=30).json()
    galleries = [c for c in config["components"] if c.get("type") == "gallery"]
    assert len(galleries) == 6 and all(not c["props"].get("value") for c in galleries)


def test_a_session_idle_for_the_stated_time_loses_its_uploads(idle_space, tmp_path):
    """The second app (idle time IDLE_SECONDS): a session that stays open but sends no request loses its
    uploads; so does an upload no session holds. Its page states that idle time."""
    import httpx

    config = httpx.get(idle_space.url + "/config", timeout=30).json()
    intro = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "copa-intro")
    assert f"once {IDLE_SECONDS} seconds passes without a request" in intro["props"]["value"]
    client = new_client(idle_space)
    try:
        classes = [("x", unique_images(tmp_path, 2, seed=31)), ("y", unique_images(tmp_path, 2, seed=32))]
        queries = unique_images(tmp_path, 1, seed=33)
        start = time.monotonic()  # the run's request (its last) comes after this
        out = classify(client, classes, queries, "ncc")
        ran = time.monotonic() - start
        assert out["json"]["classes"] == ["x", "y"], out["status"]
        files = [p for _, ps in classes for p in ps] + queries
        server_classes, server_queries = on_server(idle_space, classes, queries)  # kept after the run
        orphan = unique_images(tmp_path, 1, seed=34, prefix="orphan")[0]
        with orphan.open("rb") as handle:  # an upload that no run ever uses
            response = httpx.post(idle_space.url + "/gradio_api/upload", files={"files": handle}, timeout=30)
        assert response.status_code == 200 and len(idle_space.copies([orphan])) == 1
        idle_space.wait_until_gone(files, limit_s=IDLE_SECONDS * 3)
        gone_after = time.monotonic() - start
        assert client.heartbeat.is_alive()  # the session is still open: the idle rule did it
        check_s = IDLE_SECONDS / 4  # how often the app applies it
        assert IDLE_SECONDS <= gone_after <= ran + IDLE_SECONDS + check_s + 1, (ran, gone_after)
        idle_space.wait_until_gone([orphan], limit_s=IDLE_SECONDS * 3)
        out = classify(client, server_classes, server_queries, "ncc", as_files=server_gallery)
        assert out["status"].startswith("⚠️") and "upload it again" in out["status"]
        assert out["class_1_images"] == [] and out["query_images"] == []  # emptied, as the files went
    finally:
        client.close()
