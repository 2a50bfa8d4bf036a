"""The web playground in a real browser (Debian's chromium, headless, through chromium-driver and selenium) against the
Ray service: generate with live previews, read the final image back with the world evaluator, paint a mask and
inpaint, and see the API's message for a bad input. Instruction edits run against the in-process app serving the
embedded edit model beside the default one, over HTTP (`edit_page`): it starts in seconds, needs no cluster, and
its answers to direct requests are what the page must show.
Screenshots go to a temporary folder, or to $LIGHTRAY_SCREENSHOTS_DIR when set (`LIGHTRAY_SCREENSHOTS_DIR=docs/img
make test` refreshes the README's)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from lightray.world.evaluator import parse_prompt, score
from lightray.world.shapes import Scene, render
from testing.http_server import serve_in_thread

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(os.environ.get("LIGHTRAY_SCREENSHOTS_DIR") or tempfile.mkdtemp(prefix="lightray-screens-"))
SCREENSHOTS.mkdir(parents=True, exist_ok=True)
PROMPT = "a red circle on the left, white background"
SEED = 7
"""A seed whose image the embedded model draws right for PROMPT (the same seed gives the same pixels)."""


def _binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError(f"none of {names} is installed: `apt-get install -y chromium chromium-driver` "
                       "(`make test` does it: testing/install_browser.sh)")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = _binary("chromium", "chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(_binary("chromedriver")))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _open_playground(browser, url: str):
    browser.set_window_size(1280, 1100)
    browser.get(f"{url}/")  # `/` redirects to the playground
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.current_url.endswith("/playground"))
    wait.until(lambda d: len(d.find_element(By.ID, "model").find_elements(By.TAG_NAME, "option")) > 0)
    wait.until(lambda d: d.find_element(By.ID, "edit").get_attribute("data-mode"))  # the models' cards are read
    return browser


@pytest.fixture
def page(browser, service):
    return _open_playground(browser, service)


@pytest.fixture(scope="module")
def edit_service(make_app_with_edit_model):
    """The app over both embedded models (text-to-image and `lightray-shapes-edit`), over HTTP from this process."""
    with serve_in_thread(make_app_with_edit_model()) as url:
        yield url


@pytest.fixture
def edit_page(browser, edit_service):
    return _open_playground(browser, edit_service)


def _png_pixels(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")
    return np.asarray(image, dtype=np.int16)


def _set(driver, element_id: str, value: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def _finished(driver) -> str:
    WebDriverWait(driver, 180).until(
        lambda d: d.find_element(By.ID, "status").text.startswith(("done", "failed")))
    return driver.find_element(By.ID, "status").text


def _generate(driver, prompt: str, seed: int) -> None:
    _set(driver, "prompt", prompt)
    _set(driver, "seed", str(seed))
    driver.find_element(By.ID, "generate").click()


def _options(driver, select_id: str) -> list[str]:
    return [o.get_attribute("value") for o in driver.find_element(By.ID, select_id).find_elements(By.TAG_NAME, "option")]


def _instruction_pictures(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#instruction-images .input-image")


def test_generate_shows_previews_then_the_final_image_of_the_prompt(page):
    models = [o.get_attribute("value") for o in page.find_element(By.ID, "model").find_elements(By.TAG_NAME, "option")]
    assert "lightray-shapes-lightning-4" in models and "lightray-shapes" in models  # from GET /v1/models
    _generate(page, PROMPT, SEED)
    status = _finished(page)
    assert status.startswith("done"), page.find_element(By.ID, "error").text
    previews = page.find_elements(By.CSS_SELECTOR, "#live img.preview")
    assert len(previews) >= 1 and int(page.find_element(By.ID, "status").get_attribute("data-previews")) >= 1
    assert "step 4 / 4" in page.find_element(By.CSS_SELECTOR, "[data-live-label='0']").text
    result = page.find_element(By.CSS_SELECTOR, "#gallery .card img.result")
    pixels = _png_pixels(result.get_attribute("src"))
    assert score(pixels.astype(np.uint8), parse_prompt(PROMPT))["all"], "the image does not show the prompt"
    # A preview is an earlier, different picture of the same request: a fast one, a quarter of the side.
    preview = _png_pixels(previews[0].get_attribute("src"))
    assert preview.shape == (pixels.shape[0] // 4, pixels.shape[1] // 4, 3)
    quartered = pixels.reshape(preview.shape[0], 4, preview.shape[1], 4, 3).mean((1, 3))
    assert np.abs(preview - quartered).mean() > 0
    card = page.find_element(By.CSS_SELECTOR, "#gallery .card")
    assert card.get_attribute("data-seed") == str(SEED) and f"seed {SEED}" in card.text
    download = card.find_element(By.CSS_SELECTOR, "a.download")
    assert download.get_attribute("download").endswith(f"seed{SEED}.png")
    assert download.get_attribute("href") == result.get_attribute("src")
    _set(page, "seed", "12345")
    card.find_element(By.CSS_SELECTOR, "button.use-seed").click()
    assert page.find_element(By.ID, "seed").get_attribute("value") == str(SEED)
    page.save_screenshot(str(SCREENSHOTS / "playground.png"))


def test_paint_a_mask_and_inpaint(page):
    _generate(page, PROMPT, SEED)
    assert _finished(page).startswith("done")
    source = _png_pixels(page.find_element(By.CSS_SELECTOR, "#gallery .card img.result").get_attribute("src"))
    page.find_element(By.CSS_SELECTOR, "#gallery .card button.edit").click()
    WebDriverWait(page, 30).until(EC.element_to_be_clickable((By.ID, "run-edit")))
    canvas = page.find_element(By.ID, "mask-canvas")
    WebDriverWait(page, 30).until(lambda d: canvas.get_attribute("width") == "128")  # the default size
    page.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    _set(page, "brush", "16")
    # Paint the left half of the picture. The canvas shows the 128x128 image at 256x256 CSS pixels (offsets are from
    # its centre): top-to-bottom strokes at CSS x = 8, 40, 72, 104 with a 16-pixel brush cover image columns 0-60.
    actions = ActionChains(page)
    for x in (8, 40, 72, 104):
        actions.move_to_element_with_offset(canvas, x - 128, 8 - 128).click_and_hold()
        for y in range(8, 256, 16):
            actions.move_to_element_with_offset(canvas, x - 128, y - 128)
        actions.release()
    actions.perform()
    assert int(canvas.get_attribute("data-painted")) > 10
    _set(page, "prompt", "a green triangle on the left, white background")
    page.find_element(By.ID, "run-edit").click()
    assert _finished(page).startswith("done"), page.find_element(By.ID, "error").text
    assert len(page.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 2
    card = page.find_element(By.CSS_SELECTOR, "#gallery .card")
    assert card.get_attribute("data-kind") == "inpaint"
    edited = _png_pixels(card.find_element(By.CSS_SELECTOR, "img.result").get_attribute("src"))
    assert edited.shape == source.shape
    # Repainted where painted (the red circle on the left is gone or changed), kept elsewhere.
    assert np.abs(edited[:, :48] - source[:, :48]).mean() > 10
    assert np.abs(edited[:, 88:] - source[:, 88:]).mean() < 3
    page.set_window_size(1280, 1500)  # the editor (mask painted) and the gallery in one picture
    page.execute_script("window.scrollTo(0, 0)")
    page.save_screenshot(str(SCREENSHOTS / "playground_inpaint.png"))


def test_an_empty_prompt_shows_the_api_message(page):
    page.find_element(By.ID, "prompt").clear()
    page.find_element(By.ID, "generate").click()
    assert _finished(page) == "failed"
    message = page.find_element(By.ID, "error").text
    assert message.startswith("prompt:"), message  # the API's error.message, which names the field
    page.save_screenshot(str(SCREENSHOTS / "playground_error.png"))


def test_the_page_works_on_a_narrow_screen(page):
    page.set_window_size(420, 1400)
    _generate(page, "白色背景，左边有一个红色的圆形", SEED)
    assert _finished(page).startswith("done")
    width = page.execute_script("return document.documentElement.scrollWidth")
    assert width <= page.execute_script("return window.innerWidth")  # one column, no sideways scrolling
    controls, output, edit = (page.find_element(By.ID, name).rect for name in ("controls", "output", "edit"))
    # One column: the settings, then the results (right under the Generate button), then the editor.
    assert output["y"] >= controls["y"] + controls["height"] - 1
    assert edit["y"] >= output["y"] + output["height"] - 1
    assert output["width"] == controls["width"]
    page.execute_script("document.getElementById('generate').scrollIntoView({block: 'start'})")
    page.save_screenshot(str(SCREENSHOTS / "playground_narrow.png"))


def test_stacked_adapters_with_scales_are_sent_in_the_order_ticked(page, service, registry_root, preset,
                                                                    tmp_path):
    from testing.adapters import publish_lora_adapter

    alpha = publish_lora_adapter(registry_root, preset, "pw", "alpha", seed=1, tmp_dir=tmp_path, std=0.1).ref
    beta = publish_lora_adapter(registry_root, preset, "pw", "beta", seed=2, tmp_dir=tmp_path, std=0.1).ref
    page.refresh()
    WebDriverWait(page, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, f"[data-adapter='{beta}']"))
    page.find_element(By.CSS_SELECTOR, f"[data-adapter='{beta}']").click()
    page.find_element(By.CSS_SELECTOR, f"[data-adapter='{alpha}']").click()
    scale = page.find_element(By.CSS_SELECTOR, f"[data-scale-for='{beta}']")
    scale.clear()
    scale.send_keys("0.5")
    _generate(page, PROMPT, SEED)
    assert _finished(page).startswith("done"), page.find_element(By.ID, "error").text
    shown = page.find_element(By.CSS_SELECTOR, "#gallery .card img.result").get_attribute("src")
    # The same request made directly: beta at 0.5, then alpha at 1, stacked in that order.
    body = {"prompt": PROMPT, "seed": SEED, "model": "lightray-shapes-lightning-4",  # the page's default size
            "lora": [f"{beta}:0.5", f"{alpha}:1"]}
    direct = httpx.post(f"{service}/v1/images/generations", json=body, timeout=120).json()["data"][0]["b64_json"]
    plain = httpx.post(f"{service}/v1/images/generations", json={**body, "lora": None}, timeout=120)
    assert shown.split(",", 1)[1] == direct
    assert plain.json()["data"][0]["b64_json"] != direct  # the adapters did change the picture


def test_the_api_key_is_kept_for_the_tab_unless_remembered(page):
    key = page.find_element(By.ID, "api-key")
    key.send_keys("sk-playground-test")
    page.find_element(By.ID, "prompt").click()  # leaving the field stores it
    page.refresh()
    WebDriverWait(page, 30).until(lambda d: d.find_element(By.ID, "api-key").get_attribute("value"))
    assert page.find_element(By.ID, "api-key").get_attribute("value") == "sk-playground-test"
    # By default only this tab keeps it (sessionStorage): nothing outlives the browser session.
    assert page.execute_script("return sessionStorage.getItem('lightray.apiKey')") == "sk-playground-test"
    assert page.execute_script("return localStorage.getItem('lightray.apiKey')") is None
    page.find_element(By.ID, "remember-key").click()
    assert page.execute_script("return localStorage.getItem('lightray.apiKey')") == "sk-playground-test"
    page.find_element(By.ID, "remember-key").click()  # forgotten again
    assert page.execute_script("return localStorage.getItem('lightray.apiKey')") is None
    page.execute_script("sessionStorage.removeItem('lightray.apiKey')")
    page.find_element(By.ID, "api-key").clear()


def test_stop_cancels_the_request_on_the_service(page, ray_cluster):
    from selenium.webdriver.support.ui import Select
    from test_stream_graph import _denoiser_log

    before = _denoiser_log(ray_cluster).count("of 100 (request cancelled)")
    Select(page.find_element(By.ID, "model")).select_by_value("lightray-shapes")
    Select(page.find_element(By.ID, "size")).select_by_value("256x256")
    _set(page, "steps", "100")  # minutes of work on this CPU: it can only end by the Stop button
    _generate(page, PROMPT, SEED)
    WebDriverWait(page, 120).until(lambda d: d.find_element(By.ID, "status").text.startswith("step "))
    page.find_element(By.ID, "stop").click()
    WebDriverWait(page, 30).until(lambda d: d.find_element(By.ID, "status").text == "stopped")
    WebDriverWait(page, 60, poll_frequency=0.5).until(
        lambda d: _denoiser_log(ray_cluster).count("of 100 (request cancelled)") > before)
    assert page.find_element(By.ID, "error").text == ""


# ------------------------------------------------------------------------------------------ instruction edits
# Against the in-process app with the edit model (`edit_page`), small: 64x64, a few steps. These check what the
# page sends and shows, not what the picture looks like (tests/test_graph.py reads edits with the evaluator).

EDIT_MODEL = "lightray-shapes-edit-lightning-4"  # the page's preferred edit model (the preset's default)


def test_instruction_edit_of_a_picked_result_and_an_upload_streams_previews_then_the_image(
        edit_page, edit_service, tmp_path):
    page = edit_page
    Select(page.find_element(By.ID, "size")).select_by_value("64x64")
    _generate(page, PROMPT, SEED)
    assert _finished(page).startswith("done"), page.find_element(By.ID, "error").text
    picked = page.find_element(By.CSS_SELECTOR, "#gallery .card img.result").get_attribute("src")
    # With an instruction-edit model served, the edit section opens on it, the mask editor out of the way.
    assert page.find_element(By.ID, "mode-instruction").is_selected()
    assert page.find_element(By.ID, "instruction-panel").is_displayed()
    assert not page.find_element(By.ID, "mask-canvas").is_displayed()
    assert page.find_element(By.ID, "edit-model").get_attribute("value") == EDIT_MODEL
    assert page.find_element(By.ID, "run-instruction").get_attribute("disabled")  # no picture yet

    page.find_element(By.CSS_SELECTOR, "#gallery .card button.edit-instruction").click()
    WebDriverWait(page, 30).until(lambda d: len(_instruction_pictures(d)) == 1)
    uploaded = tmp_path / "blue-square.png"
    render(Scene("blue", "square", "right", "black"), 64).save(uploaded)
    page.find_element(By.ID, "instruction-upload").send_keys(str(uploaded))
    WebDriverWait(page, 30).until(lambda d: len(_instruction_pictures(d)) == 2)
    assert _instruction_pictures(page)[1].text.startswith("2 · 64x64")
    assert page.find_element(By.ID, "instruction-count").text == "2 of 1–3"

    instruction = "make the circle blue"
    _set(page, "instruction", instruction)
    Select(page.find_element(By.ID, "edit-size")).select_by_value("64x64")
    assert page.find_element(By.ID, "edit-steps").get_attribute("value") == "4"  # the Lightning model's default
    _set(page, "edit-steps", "3")
    assert page.find_element(By.ID, "edit-cfg").get_attribute("value") == "1"
    Select(page.find_element(By.ID, "partials")).select_by_visible_text("2")
    page.find_element(By.ID, "run-instruction").click()
    assert _finished(page).startswith("done"), page.find_element(By.ID, "error").text

    previews = page.find_elements(By.CSS_SELECTOR, "#live img.preview")
    assert len(previews) == 2 and page.find_element(By.ID, "status").get_attribute("data-previews") == "2"
    assert "step 3 / 3" in page.find_element(By.CSS_SELECTOR, "[data-live-label='0']").text
    assert _png_pixels(previews[0].get_attribute("src")).shape == (16, 16, 3)  # the fast preview: a quarter side
    cards = page.find_elements(By.CSS_SELECTOR, "#gallery .card")
    assert len(cards) == 2 and cards[0].get_attribute("data-kind") == "instruction"
    assert f"instruction edit · seed {SEED} · 64x64 · {EDIT_MODEL} · {instruction}" in cards[0].text
    shown = cards[0].find_element(By.CSS_SELECTOR, "img.result").get_attribute("src")
    assert _png_pixels(shown).shape == (64, 64, 3)
    # The same edit asked directly: the picked result, then the upload, as image[] parts in that order, with the
    # fields the page showed (a streamed image is byte-identical to the plain answer's).
    files = [("image[]", ("picked.png", base64.b64decode(picked.split(",", 1)[1]), "image/png")),
             ("image[]", ("upload.png", uploaded.read_bytes(), "image/png"))]
    data = {"model": EDIT_MODEL, "prompt": instruction, "seed": str(SEED), "size": "64x64",
            "num_inference_steps": "3", "true_cfg_scale": "1"}
    direct = httpx.post(f"{edit_service}/v1/images/edits", data=data, files=files, timeout=120)
    assert direct.status_code == 200, direct.text
    assert shown.split(",", 1)[1] == direct.json()["data"][0]["b64_json"]
    swapped = httpx.post(f"{edit_service}/v1/images/edits", data=data, files=files[::-1], timeout=120)
    assert swapped.json()["data"][0]["b64_json"] != direct.json()["data"][0]["b64_json"]  # the order reached it

    page.set_window_size(1280, 1700)  # the edit panel with its pictures, the previews and the gallery in one picture
    page.execute_script("window.scrollTo(0, 0)")
    page.save_screenshot(str(SCREENSHOTS / "playground_edit.png"))


def test_the_generation_model_list_excludes_the_edit_only_model(edit_page, tmp_path):
    page = edit_page
    generation_models = _options(page, "model")
    assert {"lightray-shapes-lightning-4", "lightray-shapes-lightning-8", "lightray-shapes"} <= set(generation_models)
    assert EDIT_MODEL not in generation_models  # its card's endpoints are ["edits"]
    # The models whose edit_mode is "instruction", in the preset's order.
    assert _options(page, "edit-model") == [EDIT_MODEL, "lightray-shapes-edit"]

    # At most 3 pictures (the card's input_images): a fourth is refused on the page, with a message.
    pictures = []
    for i, color in enumerate(("red", "green", "blue", "yellow")):
        pictures.append(tmp_path / f"{i}.png")
        render(Scene(color, "circle", "left", "white"), 64).save(pictures[-1])
    page.find_element(By.ID, "instruction-upload").send_keys("\n".join(str(p) for p in pictures))
    WebDriverWait(page, 30).until(lambda d: page.find_element(By.ID, "error").text)
    assert len(_instruction_pictures(page)) == 3
    assert "at most 3" in page.find_element(By.ID, "error").text
    _instruction_pictures(page)[0].find_element(By.CSS_SELECTOR, "button.remove-image").click()
    assert [p.text.split(" · ")[0] for p in _instruction_pictures(page)] == ["1", "2"]
    assert page.find_element(By.ID, "run-instruction").is_enabled()

    # An empty instruction reaches the API, whose message names the field.
    page.find_element(By.ID, "instruction").clear()
    page.find_element(By.ID, "run-instruction").click()
    assert _finished(page) == "failed"
    assert page.find_element(By.ID, "error").text.startswith("prompt:"), page.find_element(By.ID, "error").text


def test_inpainting_beside_an_edit_model_goes_to_the_generation_model(edit_page):
    page = edit_page
    Select(page.find_element(By.ID, "size")).select_by_value("64x64")
    _generate(page, PROMPT, SEED)
    assert _finished(page).startswith("done"), page.find_element(By.ID, "error").text
    page.find_element(By.CSS_SELECTOR, "#gallery .card button.edit").click()  # "inpaint"
    WebDriverWait(page, 30).until(EC.element_to_be_clickable((By.ID, "run-edit")))
    assert page.find_element(By.ID, "mode-inpaint").is_selected()
    assert not page.find_element(By.ID, "instruction-panel").is_displayed()
    assert page.find_element(By.ID, "mask-canvas").get_attribute("width") == "64"
    page.execute_script("document.getElementById('strength').value = '0.5'")  # img2img: nothing painted
    page.find_element(By.ID, "run-edit").click()
    assert _finished(page).startswith("done"), page.find_element(By.ID, "error").text
    card = page.find_element(By.CSS_SELECTOR, "#gallery .card")
    assert card.get_attribute("data-kind") == "inpaint" and "lightray-shapes-lightning-4" in card.text
    # Back to instruction edits from a card: the mode switches, and the inpainting picture stays where it was.
    card.find_element(By.CSS_SELECTOR, "button.edit-instruction").click()
    WebDriverWait(page, 30).until(lambda d: len(_instruction_pictures(d)) == 1)
    assert page.find_element(By.ID, "mode-instruction").is_selected()
    assert not page.find_element(By.ID, "mask-canvas").is_displayed()
    page.find_element(By.ID, "mode-inpaint").click()
    assert page.find_element(By.ID, "edit-source").get_attribute("src").startswith("blob:")
