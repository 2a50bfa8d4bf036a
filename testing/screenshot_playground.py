"""The README's playground screenshot (docs/img/playground.png), taken from a running service in headless Debian
chromium: a generation at the default size with a demo adapter ticked, its previews and image in the gallery.

    make serve &   # wait for "Lightray is serving"
    .venv/bin/python -m testing.screenshot_playground --out docs/img/playground.png
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=Path("docs/img/playground.png"))
    parser.add_argument("--prompt", default="lrzframe style, a red circle on the left, white background")
    parser.add_argument("--adapter", default="demo/frame@v1")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(f"{args.url}/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.current_url.endswith("/playground"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"[data-adapter='{args.adapter}']"))
        driver.find_element(By.CSS_SELECTOR, f"[data-adapter='{args.adapter}']").click()
        for element_id, value in (("prompt", args.prompt), ("seed", str(args.seed))):
            field = driver.find_element(By.ID, element_id)
            field.clear()
            field.send_keys(value)
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 300).until(
            lambda d: d.find_element(By.ID, "status").text.startswith(("done", "failed")))
        status = driver.find_element(By.ID, "status").text
        if not status.startswith("done"):
            raise SystemExit(f"the generation failed: {driver.find_element(By.ID, 'error').text}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"{args.out}: {status}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
