"""The playground page in headless Chromium (Debian's package, driven by Playwright; no browser download)."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.async_api import Browser, Page, async_playwright, expect

from service.settings import LOCAL_MODELS, KeyConfig
from tests.conftest import Gateway, GatewayFactory, local_config

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEY = "sk-playground-test"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not shutil.which(CHROMIUM):
        pytest.fail("chromium is not installed: run `apt-get install -y chromium` (see README)")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        yield browser
        await browser.close()


async def slow_gateway(gateway_factory: GatewayFactory) -> Gateway:
    """Eight painting steps of 0.15 s each, so the bar visibly moves; one key, so the page must send it."""
    config = local_config(steps=8, step_delay=0.15).model_copy(
        update={"keys": [KeyConfig(name="pg", key=KEY)]}
    )
    return await gateway_factory(config=config)


async def open_playground(browser: Browser, gw: Gateway) -> Page:
    page = await browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page.on("pageerror", lambda exc: pytest.fail(f"script error on the page: {exc}"))
    await page.goto(gw.url + "/playground")
    await page.fill("#api-key", KEY)
    await page.press("#api-key", "Tab")  # `change`: stores the key and loads the models with it
    await expect(page.locator("#model option[value='imagegw-local']")).to_have_count(1)
    return page


def screenshot_path(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("IMAGEGW_TEST_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


async def test_generate_shows_progress_partials_and_gallery(
    gateway_factory: GatewayFactory, browser: Browser, tmp_path: Path
) -> None:
    gw = await slow_gateway(gateway_factory)
    page = await open_playground(browser, gw)
    assert await page.evaluate("localStorage.getItem('imagegw.apiKey')") == KEY
    assert await page.locator("#model option").all_inner_texts() == list(LOCAL_MODELS)

    await page.select_option("#model", "imagegw-local")
    await page.fill("#prompt", "a lighthouse at dusk")
    await page.fill("#size", "512x384")
    await page.fill("#n", "2")
    await page.select_option("#output-format", "webp")
    await page.select_option("#quality", "high")
    await page.select_option("#partial-images", "2")
    # record every value the bar shows, as a person watching it would see them
    await page.evaluate("""() => {
        window.seen = [];
        const bar = document.getElementById('progress');
        new MutationObserver(() => window.seen.push([Number(bar.getAttribute('aria-valuenow')),
                                                     document.getElementById('stage').textContent]))
            .observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']});
    }""")
    await page.click("#generate")

    await expect(page.locator("#stage")).to_contain_text("painting")
    mid_screenshot = screenshot_path(tmp_path, "playground-progress.png")
    await page.screenshot(path=str(mid_screenshot))
    await expect(page.locator("#gallery img.result")).to_have_count(2, timeout=20_000)
    await expect(page.locator("#stage")).to_have_text("done")
    await expect(page.locator("#percent")).to_have_text("100%")
    await expect(page.locator("#error")).to_be_hidden()

    seen = await page.evaluate("window.seen")
    values = [v for v, _ in seen]
    assert values[-1] == 100
    assert any(0 < v < 100 for v in values), seen
    assert values == sorted(values), f"the bar went backwards: {seen}"
    assert any(stage.startswith("painting ") for _, stage in seen), seen
    await expect(page.locator("#partials img.partial")).to_have_count(2)

    sizes = await page.eval_on_selector_all(
        "#gallery img.result", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])"
    )
    assert sizes == [[512, 384], [512, 384]]
    link = page.locator("#gallery a", has_text="Download").first
    async with page.expect_download() as info:
        await link.click()
    download = await info.value
    assert download.suggested_filename.endswith("-1.webp")
    saved = tmp_path / download.suggested_filename
    await download.save_as(saved)
    with Image.open(io.BytesIO(saved.read_bytes())) as image:
        assert image.format == "WEBP" and image.size == (512, 384)

    await page.screenshot(path=str(screenshot_path(tmp_path, "playground.png")), full_page=True)
    assert mid_screenshot.stat().st_size > 10_000


async def test_errors_are_readable(gateway_factory: GatewayFactory, browser: Browser, tmp_path: Path) -> None:
    gw = await slow_gateway(gateway_factory)
    page = await open_playground(browser, gw)
    await page.select_option("#model", "dall-e-3")
    await page.fill("#prompt", "a tiny kite")
    await page.fill("#size", "256x256")
    await page.click("#generate")
    error = page.locator("#error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("The request was rejected")
    await expect(error).to_contain_text(
        "Invalid value for 'size': '256x256' is not supported by model 'dall-e-3'"
    )
    await expect(error).to_contain_text("HTTP 400 · invalid_value · param: size")
    await expect(page.locator("#generate")).to_be_enabled()

    await page.fill("#api-key", "sk-wrong")
    await page.press("#api-key", "Tab")
    await expect(error).to_contain_text("Could not load the models")
    await expect(error).to_contain_text("Incorrect API key provided. (HTTP 401 · invalid_api_key)")
    await page.screenshot(path=str(screenshot_path(tmp_path, "playground-error.png")))


async def test_page_and_vendored_client_are_served_without_a_key(
    gateway_factory: GatewayFactory, browser: Browser
) -> None:
    gw = await slow_gateway(gateway_factory)
    page = await browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    await page.goto(gw.url + "/playground")
    assert await page.evaluate("typeof io === 'function' && typeof io.Manager === 'function'")
    # nothing is fetched from anywhere but the gateway itself
    assert requests and all(url.startswith(gw.url) for url in requests), requests
