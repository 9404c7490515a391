"""The Space in a real browser: Debian's Chromium, driven by Playwright, uploads support and query images,
presses Classify, waits for the predictions and the plot, and saves a screenshot of the page.

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
from .test_space_app import CLASSES, real_task, require_module, space  # noqa: F401

SCREENSHOT = Path(os.environ.get("SPACE_SCREENSHOT") or REPO_ROOT / "outputs" / "space_screenshot.png")
WAIT_MS = 120_000  # only bounds a hung page; a healthy run takes seconds


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


def test_a_user_classifies_uploaded_images_in_chromium(browser, space, real_task):  # noqa: F811
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(space.url + "/")

    for index, (name, paths) in enumerate(real_task.support.items(), start=1):
        page.locator(f"#class-{index}-name input").fill(name)
        page.locator(f"#class-{index}-images input[type=file]").set_input_files([str(p) for p in paths])
        expect(page.locator(f"#class-{index}-images .thumbnail-item img")).to_have_count(
            len(paths), timeout=WAIT_MS
        )
    page.locator("#query-images input[type=file]").set_input_files([str(p) for p in real_task.queries])
    expect(page.locator("#query-images .thumbnail-item img")).to_have_count(
        len(real_task.queries), timeout=WAIT_MS
    )
    expect(page.get_by_label("copa", exact=True)).to_be_checked()  # the default method

    page.locator("#copa-classify").click()
    cards = page.locator("#copa-predictions .copa-card")
    expect(cards).to_have_count(len(real_task.queries), timeout=WAIT_MS)
    plot = page.locator("#copa-plot img")
    expect(plot).to_be_visible(timeout=WAIT_MS)
    assert plot.evaluate("img => img.complete && img.naturalWidth") > 300  # the figure, decoded

    status = page.locator("#copa-status").inner_text()
    assert re.search(r"copa adapted to 3 classes from 12 support images in [0-9.]+ s", status)
    assert re.search(r"gap .*: [0-9.]+ before → [0-9.]+ after adaptation", status)
    for index, query in enumerate(real_task.queries):
        card = cards.nth(index).inner_text()
        assert query.name in card
        predicted = cards.nth(index).locator(".copa-prediction").inner_text().split(" · ")[0]
        assert predicted in CLASSES
        percentages = [
            float(x.rstrip("%")) for x in cards.nth(index).locator(".copa-probability").all_inner_texts()
        ]
        assert len(percentages) == len(CLASSES) and sum(percentages) == pytest.approx(100, abs=0.2)
    # The uploads were deleted from the server, and the page shows that they are gone.
    expect(page.locator("#query-images .thumbnail-item")).to_have_count(0)
    assert "were deleted from the server" in status
    assert errors == []

    page.mouse.move(0, 0)  # no hover highlight in the picture
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 50_000
    page.close()
