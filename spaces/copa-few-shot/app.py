"""CoPA few-shot image classification, as a Gradio Space: name a few classes, upload a few images of each,
and classify new images after adapting a frozen backbone with CoPA, URL, NCC or TSA.

The UI only: checking the task, adapting, the plot, the Hub upload and which uploads a session holds live in
`hf_copa.interactive`. Run locally with `python spaces/copa-few-shot/app.py`; `MODEL_ID` picks another
backbone (Hub id or folder), `COPA_SPACE_IDLE_SECONDS` the idle time after which a session's uploads are
deleted (default 3600).
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
import threading
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from hf_copa.bundled import DEFAULT_MODEL
from hf_copa.interactive import (
    SessionUploads,
    TaskError,
    TaskLimits,
    build_task,
    embedding_figure,
    example_tasks,
    methods,
    predictions_html,
    push_classifier,
    run_task,
    summary_markdown,
)
from hf_copa.pretrained import load_model

logger = logging.getLogger("copa-space")

LIMITS = TaskLimits()
MODEL_ID = os.environ.get("MODEL_ID") or DEFAULT_MODEL
MODEL = load_model(MODEL_ID)
EXAMPLES = example_tasks()
# Bundled example images are public, and every session that loads an example shares gradio's cached copy:
# recognised by content, they are never deleted as uploads are.
EXAMPLE_FILES = sorted(
    {
        path
        for task in EXAMPLES.values()
        for path in [*(p for _, ps in task.classes for p in ps), *task.queries]
    }
)
EXAMPLE_ROOTS = sorted({str(path.parents[2]) for task in EXAMPLES.values() for path in task.queries})
# How long a session may go without a request before its uploads (and its adapted head) are dropped.
IDLE_SECONDS = float(os.environ.get("COPA_SPACE_IDLE_SECONDS") or 3600)


def intro(uploads: SessionUploads) -> str:
    return f"""
# CoPA few-shot image classification

Teach a classifier new classes from a handful of images. A frozen ResNet backbone (`{MODEL_ID}`) embeds the
images; **CoPA** (Tian et al., *Mind the Gap Between Prototypes and Images in Cross-domain Finetuning*,
NeurIPS 2024) then learns two small maps, Θ_I for image embeddings and Θ_P for class prototypes, so that each
image lands near its class. **TSA** and **CoPA+TSA** also adapt the backbone itself with small residual
adapters: often better on unfamiliar images, but the backbone then runs 40 times, so they take longer.
The plot shows that space before and after adaptation, and the gap between the mean image and the mean
prototype that the paper studies.

**Limits:** {LIMITS.describe()} Requests are queued and run one at a time.

**Privacy:** {uploads.describe()}
"""


CSS = """
#copa-classify { min-height: 52px; font-size: 1.1em; }
"""


def upload_folder() -> Path:
    """Where gradio keeps uploads (its documented GRADIO_TEMP_DIR rule)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def gallery_paths(value: Any) -> list[str]:
    """A gallery's value (a list of (path, caption) pairs, or None) -> its file paths."""
    return [item[0] if isinstance(item, tuple | list) else item for item in value or []]


def session_of(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


# Named parameters for API clients (gradio reads the signature): class_1_name, class_1_images, ..., method.
API_PARAMETERS = [
    f"class_{index}_{part}" for index in range(1, LIMITS.max_classes + 1) for part in ("name", "images")
] + ["query_images", "method"]


def classify_fn(uploads: SessionUploads):
    """The Classify handler: (class name, class images) per class slot, the query images, the method, and
    (from gradio) the request, whose session then holds the uploads."""

    def classify(*inputs: Any) -> tuple[Any, ...]:
        """Check the task, adapt, classify; every outcome is a message in the page, never a traceback.
        The galleries keep their images, for another run; only those whose files have gone are emptied."""
        *slots, queries, method, request = inputs
        names, galleries = slots[0::2], slots[1::2]
        paths = [gallery_paths(g) for g in [*galleries, queries]]
        uploads.touch(session_of(request), [p for group in paths for p in group])
        results: tuple[Any, ...] = ("", None, None, None)  # predictions, plot, JSON, the head for "Push"
        try:
            task = build_task(list(zip(names, paths[:-1], strict=True)), paths[-1], LIMITS)
            result = run_task(MODEL, task, method or "copa")
            status = summary_markdown(result)
            results = (
                predictions_html(result),
                embedding_figure(result),
                result.to_json(),
                result.classifier,
            )
        except TaskError as err:
            status = f"⚠️ {err}"
        except Exception:  # a bug, not the user's fault: say so without a traceback, and log it
            logger.exception("classification failed")
            status = "⚠️ Something went wrong on the server while classifying; please try again."
        kept = [[p for p in group if Path(p).is_file()] for group in paths]
        galleries_out = [
            gr.skip() if len(k) == len(p) else (k or None) for k, p in zip(kept, paths, strict=True)
        ]
        return (status, *results, *galleries_out)

    classify.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in API_PARAMETERS]
        + [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)]
    )
    classify.__annotations__ = {"request": gr.Request}  # (gradio reads the type to pass the request)
    return classify


def push_fn(uploads: SessionUploads):
    def push(classifier: Any, repo_id: str, token: str, request: gr.Request) -> str:
        """Upload the head adapted in this session's last run, with the user's own token."""
        uploads.touch(session_of(request))
        if classifier is None:
            return "⚠️ Classify first: the head that gets pushed is the one adapted in your last run."
        try:
            url = push_classifier(classifier, repo_id, token)
        except TaskError as err:
            return f"⚠️ {err}"
        except Exception:
            logger.exception("push failed")
            return "⚠️ Something went wrong on the server while pushing; please try again."
        return f"✅ Pushed the adapted head to [{repo_id.strip()}]({url})."

    return push


def hold_fn(uploads: SessionUploads):
    def hold(value: Any, request: gr.Request) -> None:
        """A gallery received uploads: this session holds them from now on (deleted when it ends)."""
        uploads.touch(session_of(request), gallery_paths(value))

    return hold


def end_fn(uploads: SessionUploads):
    def end(request: gr.Request) -> None:
        """The page was closed or reloaded: its session's uploads are deleted now."""
        deleted = uploads.end(session_of(request))
        if deleted:
            logger.info("session ended: deleted %d uploaded file(s)", len(deleted))

    return end


def load_example(key: str) -> tuple[Any, ...]:
    """Fill every class slot and the queries with a bundled example task (empty slots cleared)."""
    task = EXAMPLES[key]
    values: list[Any] = []
    for slot in range(LIMITS.max_classes):
        name, paths = task.classes[slot] if slot < len(task.classes) else ("", None)
        values += [name, [str(p) for p in paths] if paths else None]
    return (*values, [str(p) for p in task.queries], "")


def class_slot(index: int) -> list[gr.components.Component]:
    """A class's name box and image gallery."""
    with gr.Column(variant="panel"):
        name = gr.Textbox(
            label=f"Class {index + 1} name",
            placeholder="e.g. cat" if index == 0 else None,
            max_lines=1,
            elem_id=f"class-{index + 1}-name",
        )
        images = gr.Gallery(
            label=f"Class {index + 1} images",
            file_types=["image"],
            type="filepath",
            columns=6,
            height=150,
            object_fit="contain",
            interactive=True,
            elem_id=f"class-{index + 1}-images",
        )
    return [name, images]


def build_app(idle_seconds: float | None = None) -> tuple[gr.Blocks, SessionUploads]:
    """The Space and the register of its sessions' uploads; `idle_seconds` defaults to IDLE_SECONDS."""
    uploads = SessionUploads(
        upload_folder(), IDLE_SECONDS if idle_seconds is None else idle_seconds, EXAMPLE_FILES
    )
    with gr.Blocks(title="CoPA few-shot classification", analytics_enabled=False) as demo:
        gr.Markdown(intro(uploads), elem_id="copa-intro")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                gr.Markdown("### 1 · Classes: name each one and upload a few images of it")
                slots: list[gr.components.Component] = []
                shown = min(3, LIMITS.max_classes)
                for index in range(shown):
                    slots += class_slot(index)
                if LIMITS.max_classes > shown:
                    with gr.Accordion(f"More classes (up to {LIMITS.max_classes})", open=False):
                        for index in range(shown, LIMITS.max_classes):
                            slots += class_slot(index)
            with gr.Column(scale=2):
                gr.Markdown("### 2 · Images to classify")
                queries = gr.Gallery(
                    label="Query images",
                    file_types=["image"],
                    type="filepath",
                    columns=4,
                    height=220,
                    object_fit="contain",
                    interactive=True,
                    elem_id="query-images",
                )
                method = gr.Radio(
                    list(methods(MODEL)),
                    value="copa",
                    label="Method",
                    info="; ".join(f"{name} {what}" for name, what in methods(MODEL).items()) + ".",
                )
                classify_button = gr.Button("Classify", variant="primary", elem_id="copa-classify")
                gr.Markdown("**Or start from an example task** (real images; then press Classify):")
                example_buttons = {
                    key: gr.Button(task.title, size="sm", elem_id=f"example-{key}")
                    for key, task in EXAMPLES.items()
                }
        gr.Markdown("### 3 · Results")
        status = gr.Markdown(label="Summary", elem_id="copa-status")
        cards = gr.HTML(label="Predictions", elem_id="copa-predictions")
        gr.Markdown(
            "**Embedding space before and after adaptation**: support images, prototypes and queries, "
            "L2-normalised and projected to 2-D by PCA; the gap is measured in all dimensions."
        )
        plot = gr.Plot(label="Embedding space", show_label=False, format="png", elem_id="copa-plot")
        with gr.Accordion("Raw results (JSON)", open=False):
            raw = gr.JSON(label="Predictions, probabilities, timing and gap")
        classifier_state = gr.State(time_to_live=uploads.idle_seconds)
        with gr.Accordion("Push the adapted classifier to the Hugging Face Hub (optional)", open=False):
            gr.Markdown(
                "Uploads only the adapted head (prototypes and maps, a few MB at most) with its model card; "
                "it loads back with `CopaForFewShotClassification.from_pretrained(repo_id)`. Your token is "
                "used for this upload only and is not stored."
            )
            with gr.Row():
                repo_id = gr.Textbox(label="Repository id", placeholder="your-name/copa-head", max_lines=1)
                token = gr.Textbox(label="Hugging Face token (write)", type="password", max_lines=1)
            push_button = gr.Button("Push to the Hub")
            push_status = gr.Markdown(label="Push status")

        galleries = [*slots[1::2], queries]
        classify_button.click(
            classify_fn(uploads),
            inputs=[*slots, queries, method],
            outputs=[status, cards, plot, raw, classifier_state, *galleries],
            api_name="classify",
            concurrency_limit=1,
            concurrency_id="adapt",
        )
        push_button.click(
            push_fn(uploads), inputs=[classifier_state, repo_id, token], outputs=push_status, api_name="push"
        )
        for key, button in example_buttons.items():
            button.click(
                partial(load_example, key),
                outputs=[*slots, queries, status],
                api_visibility="private",
                concurrency_limit=None,
            )
        for gallery in galleries:  # the session holds what it uploads at once, not only once it runs
            gallery.upload(
                hold_fn(uploads),
                inputs=gallery,
                outputs=None,
                queue=False,
                show_progress="hidden",
                api_visibility="private",
            )
        demo.unload(end_fn(uploads))
    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo, uploads


@asynccontextmanager
async def sweeping(demo: gr.Blocks, uploads: SessionUploads, app: Any):
    """While the server runs, apply the idle rule every `uploads.check_seconds`; when it stops, delete every
    upload. (A lifespan of gradio's FastAPI app: it starts and stops with the server.)"""
    stop = threading.Event()

    def sweep() -> None:
        while not stop.wait(uploads.check_seconds):
            try:
                deleted = uploads.sweep(set(demo.upload_file_set))
            except Exception:
                logger.exception("sweeping uploads failed")
                continue
            demo.upload_file_set.difference_update([str(path) for path in deleted])
            if deleted:
                logger.info("idle: deleted %d uploaded file(s)", len(deleted))

    thread = threading.Thread(target=sweep, name="copa-upload-sweeper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        uploads.close(set(demo.upload_file_set))


demo, UPLOADS = build_app()

if __name__ == "__main__":
    demo.launch(
        max_file_size=LIMITS.max_file_bytes,
        allowed_paths=EXAMPLE_ROOTS,
        theme=gr.themes.Soft(),
        css=CSS,
        app_kwargs={"lifespan": partial(sweeping, demo, UPLOADS)},
    )
