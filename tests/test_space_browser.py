"""The Space in a real browser: Debian's Chromium, driven by Playwright, uploads support and query images,
presses Classify, waits for the predictions and the plot, reruns with another method on the images still in
the galleries (no new upload), saves a screenshot of the page, and checks that closing the page deletes the
session's uploads from the server.

Chromium comes from Debian (`apt-get install chromium`, which .ci/run does); without it the test is skipped
locally and fails in CI (CI=true). The screenshot goes to outputs/space_screenshot.png (or $SPACE_SCREENSHOT).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, unavailable
from .test_space_app import CLASSES, ImageTask, real_task, require_module, space, unique_images  # noqa: F401

SCREENSHOT = Path(os.environ.get("SPACE_SCREENSHOT") or REPO_ROOT / "outputs" / "space_screenshot.png")
WAIT_MS = 120_000  # only bounds a hung page; a healthy run takes seconds


@pytest.fixture(scope="module")
def browser_task(real_task, tmp_path_factory) -> ImageTask:  # noqa: F811
    """The CIFAR-10 task, the same images in files of their own (a few bytes after the image's end, which
    decoders ignore): gradio keeps one file per content, and only the page's session is to hold these."""
    folder = tmp_path_factory.mktemp("browser-task")

    def own(path: Path) -> Path:
        copy = folder / path.name
        copy.write_bytes(path.read_bytes() + b"browser test")
        return copy

    support = {name: [own(p) for p in paths] for name, paths in real_task.support.items()}
    return ImageTask(support, [own(p) for p in real_task.queries])


@pytest.fixture(scope="module")
def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not path:
        unavailable("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return path


@pytest.fixture(scope="module")
def browser(chromium):
    sync_api = require_module("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


def test_a_user_classifies_uploaded_images_and_reruns_them_in_chromium(browser, space, browser_task):  # noqa: F811
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    uploads: list[str] = []
    page.on("request", lambda request: uploads.append(request.url) if "/upload" in request.url else None)
    page.goto(space.url + "/")

    galleries = {
        f"#class-{i}-images": paths for i, paths in enumerate(browser_task.support.values(), start=1)
    }
    galleries["#query-images"] = browser_task.queries
    for index, name in enumerate(browser_task.support, start=1):
        page.locator(f"#class-{index}-name input").fill(name)
    for selector, paths in galleries.items():
        page.locator(f"{selector} input[type=file]").set_input_files([str(p) for p in paths])
        expect(page.locator(f"{selector} .thumbnail-item img")).to_have_count(len(paths), timeout=WAIT_MS)
    expect(page.get_by_label("copa", exact=True)).to_be_checked()  # the default method
    files = [p for paths in galleries.values() for p in paths]
    assert uploads and len(space.copies(files)) == len(files)

    page.locator("#copa-classify").click()
    cards = page.locator("#copa-predictions .copa-card")
    expect(cards).to_have_count(len(browser_task.queries), timeout=WAIT_MS)
    plot = page.locator("#copa-plot img")
    expect(plot).to_be_visible(timeout=WAIT_MS)
    assert plot.evaluate("img => img.complete && img.naturalWidth") > 300  # the figure, decoded

    status = page.locator("#copa-status").inner_text()
    assert re.search(r"copa adapted to 3 classes from 12 support images in [0-9.]+ s", status)
    assert re.search(r"gap .*: [0-9.]+ before → [0-9.]+ after adaptation", status)
    for index, query in enumerate(browser_task.queries):
        card = cards.nth(index).inner_text()
        assert query.name in card
        predicted = cards.nth(index).locator(".copa-prediction").inner_text().split(" · ")[0]
        assert predicted in CLASSES
        percentages = [
            float(x.rstrip("%")) for x in cards.nth(index).locator(".copa-probability").all_inner_texts()
        ]
        assert len(percentages) == len(CLASSES) and sum(percentages) == pytest.approx(100, abs=0.2)
    for selector, paths in galleries.items():  # the galleries still hold the uploads
        expect(page.locator(f"{selector} .thumbnail-item img")).to_have_count(len(paths))

    # Another method on the same images: Classify again, nothing uploaded again.
    uploaded_before = len(uploads)
    page.get_by_label("url", exact=True).check()
    page.locator("#copa-classify").click()
    expect(page.locator("#copa-status")).to_contain_text("url adapted to 3 classes", timeout=WAIT_MS)
    expect(cards).to_have_count(len(browser_task.queries), timeout=WAIT_MS)
    assert len(uploads) == uploaded_before
    for selector, paths in galleries.items():
        expect(page.locator(f"{selector} .thumbnail-item img")).to_have_count(len(paths))
    assert "deleted" not in page.locator("#copa-status").inner_text()
    assert errors == []

    page.mouse.move(0, 0)  # no hover highlight in the picture
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 50_000

    assert len(space.copies(files)) == len(files)
    page.close()  # the session ends: its uploads are deleted
    space.wait_until_gone(files)


def test_closing_the_page_deletes_uploads_it_never_ran(browser, space, tmp_path):  # noqa: F811
    """Uploads are the session's from the moment they arrive, not only once they are classified."""
    from playwright.sync_api import expect

    images = unique_images(tmp_path, 2, seed=41)
    page = browser.new_page()
    page.goto(space.url + "/")
    page.locator("#class-1-images input[type=file]").set_input_files([str(p) for p in images])
    expect(page.locator("#class-1-images .thumbnail-item img")).to_have_count(2, timeout=WAIT_MS)
    assert len(space.copies(images)) == 2
    page.wait_for_timeout(1000)  # (the upload event that registers them runs right after the upload)
    page.close()
    space.wait_until_gone(images)  # not after the idle hour: at once
