"""The playground page in a real browser (Chromium driven by Playwright) against a
real `retouch serve --model fixture`: an edit end to end, a refused key, a refused image."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

from tests.support import REPO, ServeProcess, image_bytes, png_bytes, retouch_cli

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # the `browser` fixture fails with how to install it
    sync_playwright = None

pytestmark = pytest.mark.acceptance

CHROMIUM = os.environ.get("RETOUCH_TEST_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
INSTALL = (
    "The playground test needs Chromium and Playwright (CI installs both): "
    "`apt-get install -y --no-install-recommends chromium` (or point RETOUCH_TEST_CHROMIUM "
    "at a Chromium binary) and `pip install playwright` (it is in the `dev` extra). "
    "`playwright install` is not needed."
)
# The README's screenshot; `RETOUCH_UPDATE_SCREENSHOT=1` refreshes it, otherwise the
# test takes it into its temporary folder (the page must still render it).
SCREENSHOT = REPO / "docs" / "playground.png"
UPDATE_SCREENSHOT = os.environ.get("RETOUCH_UPDATE_SCREENSHOT") == "1"
RESULT_DONE = """() => {
    const img = document.querySelector('#result-figures img');
    return img !== null && img.complete && img.naturalWidth > 0;
}"""
# Every status text and progress value the page shows, in order.
RECORD_PROGRESS = """() => {
    window.seen = [];
    const status = document.getElementById('status');
    const progress = document.getElementById('progress');
    const note = () => window.seen.push([status.textContent, progress.value]);
    const text = {childList: true, characterData: true, subtree: true};
    new MutationObserver(note).observe(status, text);
    new MutationObserver(note).observe(progress, {attributes: true, childList: true});
}"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, str]]:
    data_dir = tmp_path_factory.mktemp("playground") / "data"
    created = retouch_cli("keys", "create", "--name", "alice", "--data-dir", str(data_dir))
    # 60 steps of the fixture engine: about a second of visible progress.
    process = ServeProcess(data_dir, "--model", "fixture", "--steps", "60")
    process.start()
    yield process, created.stdout.strip()
    process.stop()


@pytest.fixture
def server(served: tuple[ServeProcess, str]) -> ServeProcess:
    ServeProcess.served_data_dirs.add(served[0].data_dir)  # its ledger is checked after each test
    return served[0]


@pytest.fixture
def key(served: tuple[ServeProcess, str]) -> str:
    return served[1]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        pytest.fail(f"Playwright is not installed. {INSTALL}", pytrace=False)
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"No Chromium at {CHROMIUM}. {INSTALL}", pytrace=False)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, server: ServeProcess) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light")
    context.set_default_timeout(20_000)
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    opened.on(
        "console",
        lambda message: (
            problems.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    opened.goto(f"{server.url}/")  # the root redirects to the playground
    expect(opened).to_have_url(f"{server.url}/playground")
    yield opened
    context.close()
    assert not problems, problems


def scene_png(size: tuple[int, int] = (512, 512)) -> bytes:
    """A small landscape, so the screenshot shows something (the fixture inverts it)."""
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for y in range(height):
        shade = y / height
        draw.line([(0, y), (width, y)], fill=(70 + int(120 * shade), 130 + int(80 * shade), 220))
    draw.ellipse([width * 0.62, height * 0.14, width * 0.82, height * 0.34], fill=(255, 214, 90))
    draw.polygon(
        [(0, height * 0.7), (width * 0.3, height * 0.5), (width * 0.6, height * 0.68),
         (width * 0.85, height * 0.55), (width, height * 0.64), (width, height), (0, height)],
        fill=(46, 110, 70),
    )  # fmt: skip
    return image_bytes(image, "PNG")


def choose(page: Page, path: Path, data: bytes, key: str, prompt: str) -> None:
    path.write_bytes(data)
    page.get_by_label("API key").fill(key)
    page.set_input_files("#file-input", str(path))
    expect(page.locator("#thumbs li")).to_have_count(1)
    expect(page.get_by_role("button", name=f"Remove image 1, {path.name}")).to_be_visible()
    page.get_by_label("Prompt").fill(prompt)


def test_the_page_and_its_files_are_served_with_their_types(server: ServeProcess) -> None:
    root = httpx.get(f"{server.url}/")
    assert root.status_code == 307 and root.headers["location"] == "playground"
    page = httpx.get(f"{server.url}/playground")
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "https://" not in page.text and "http://" not in page.text  # nothing from elsewhere
    for name, content_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = httpx.get(f"{server.url}/playground/{name}")
        assert asset.status_code == 200, name
        assert asset.headers["content-type"] == f"{content_type}; charset=utf-8"
        assert asset.headers["x-content-type-options"] == "nosniff"
        assert "@import" not in asset.text and "url(http" not in asset.text
    assert "/playground" not in httpx.get(f"{server.url}/openapi.json").text


def test_an_edit_from_the_page(page: Page, server: ServeProcess, key: str, tmp_path: Path) -> None:
    for control in ("API key", "Prompt", "Seed", "Output size", "Results", "Model"):
        expect(page.get_by_label(control, exact=True)).to_have_count(1)
    expect(page.get_by_label("Choose images")).to_have_attribute("type", "file")
    choose(page, tmp_path / "harbour.png", scene_png(), key, "make it a winter evening")
    page.get_by_text("Options").click()
    page.get_by_label("Output size").select_option("512x512")
    page.get_by_label("Seed").fill("7")
    page.evaluate(RECORD_PROGRESS)
    requests: list[str] = []
    page.on("request", lambda request: requests.append(f"{request.method} {request.url}"))

    page.get_by_role("button", name="Edit images").click()
    page.wait_for_function(RESULT_DONE)

    expect(page.locator("#status")).to_contain_text("Done in")
    expect(page.locator("#error")).to_be_empty()
    seen: list[list[Any]] = page.evaluate("window.seen")
    statuses = [text for text, _ in seen]
    assert any(text.startswith("Uploading image 1 of 1") for text in statuses), statuses
    assert "Editing…" in statuses, statuses
    assert any(0 < value < 100 for _, value in seen), seen  # live progress, step by step
    assert seen[-1][1] == 100
    assert re.fullmatch(r"\d+\.\d s", page.locator("#elapsed").inner_text())
    api_calls = [r.replace(server.url, "") for r in requests if "/v1/" in r and "/files/" not in r]
    task_id = page.locator("#summary").inner_text().split()[1]
    assert api_calls == [  # followed through the event stream alone: no polling
        "POST /v1/uploads",
        "POST /v1/images/generations",
        f"GET /v1/tasks/{task_id}/events",
    ], api_calls

    source = page.locator("#input-figures img")
    result = page.locator("#result-figures img")
    assert source.evaluate("img => img.naturalWidth") == 512
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [512, 512]
    expect(result).to_have_attribute("alt", "Result 1 of the edit: make it a winter evening")
    source_box, result_box = source.bounding_box(), result.bounding_box()
    assert source_box is not None and result_box is not None
    assert result_box["x"] >= source_box["x"] + source_box["width"]  # side by side
    assert abs(result_box["y"] - source_box["y"]) < 40
    download = page.get_by_role("link", name="Download result 1 (PNG)")
    href = download.get_attribute("href") or ""
    assert href.startswith(f"{server.url}/v1/files/task-unified-"), href
    assert httpx.get(href).headers["content-type"] == "image/png"

    screenshot = SCREENSHOT if UPDATE_SCREENSHOT else tmp_path / SCREENSHOT.name
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size < 600_000  # small enough for the README

    # The key stays for this tab until forgotten.
    page.reload()
    expect(page.get_by_label("API key")).to_have_value(key)
    page.get_by_role("button", name="Forget key").click()
    expect(page.get_by_label("API key")).to_have_value("")
    assert page.evaluate("sessionStorage.length") == 0


def test_a_refused_key_is_said_in_plain_words(page: Page, tmp_path: Path) -> None:
    choose(page, tmp_path / "photo.png", png_bytes(), "rt_not_a_real_key", "make it blue")
    page.get_by_role("button", name="Edit images").click()
    expect(page.get_by_role("alert")).to_contain_text("This API key was not accepted")
    expect(page.locator("#status")).to_have_text("The edit could not start.")
    expect(page.get_by_role("button", name="Edit images")).to_be_enabled()
    expect(page.locator("#results")).to_be_hidden()


def test_a_too_small_image_shows_the_servers_reason(
    page: Page, server: ServeProcess, key: str, tmp_path: Path
) -> None:
    tiny = png_bytes((100, 100))
    refused = httpx.post(
        f"{server.url}/v1/uploads",
        headers={"Authorization": f"Bearer {key}"},
        files={"file": ("tiny.png", tiny, "image/png")},
    )
    assert refused.status_code == 400, refused.text
    reason = refused.json()["error"]["message"].rstrip(".")
    assert "384" in reason

    choose(page, tmp_path / "tiny.png", tiny, key, "make it blue")
    page.get_by_role("button", name="Edit images").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("tiny.png was not accepted")
    expect(alert).to_contain_text(reason)
    expect(page.locator("#results")).to_be_hidden()


def test_without_the_event_stream_the_page_polls(
    page: Page, server: ServeProcess, key: str, tmp_path: Path
) -> None:
    page.route("**/events", lambda route: route.abort())
    polls: list[str] = []
    page.on(
        "request",
        lambda request: (
            polls.append(request.url) if re.search(r"/v1/tasks/[^/]+$", request.url) else None
        ),
    )
    choose(page, tmp_path / "photo.png", png_bytes(), key, "make it blue")
    page.get_by_role("button", name="Edit images").click()
    page.wait_for_function(RESULT_DONE)
    expect(page.locator("#status")).to_contain_text("Done in")
    assert polls, "the page never polled the task"


def test_images_by_keyboard_and_by_dropping(page: Page, tmp_path: Path) -> None:
    picture = tmp_path / "photo.png"
    picture.write_bytes(png_bytes())
    page.get_by_label("API key").focus()
    page.keyboard.press("Tab")  # Forget key
    page.keyboard.press("Tab")  # the file input, behind the drop zone
    expect(page.get_by_label("Choose images")).to_be_focused()
    outline = page.locator("#drop-zone").evaluate("zone => getComputedStyle(zone).outlineStyle")
    assert outline == "solid"  # the focus shows on the drop zone
    # (Space on the focused input opens the system chooser; a headless browser under
    # load does not always report that event in time, so the files are set directly.)
    page.get_by_label("Choose images").set_input_files(str(picture))
    expect(page.locator("#thumbs li")).to_have_count(1)

    page.locator("#drop-zone").evaluate(
        """zone => {
            const files = new DataTransfer();
            for (const name of ["a.png", "b.png", "c.png"]) {
                files.items.add(new File(["x"], name, {type: "image/png"}));
            }
            zone.dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true}));
        }"""
    )
    expect(page.locator("#thumbs li")).to_have_count(3)
    expect(page.get_by_role("alert")).to_have_text(
        "An edit takes at most 3 images; 1 was not added."
    )
    remove = page.get_by_role("button", name="Remove image 2, a.png")
    remove.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#thumbs li")).to_have_count(2)
    expect(page.get_by_role("button", name="Remove image 2, b.png")).to_be_focused()
