"""The Airflow UI as a person sees it: log in, find both DAGs, open the finished training run
and a task log that shows the container's own output. Drives Debian's Chromium (never a
Playwright-downloaded browser) and saves the screenshots the README shows, in imgs/.
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.parse
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IMGS = Path(__file__).resolve().parents[2] / "imgs"
VIEWPORT = {"width": 1680, "height": 960}
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright python package")
    if not shutil.which(CHROMIUM):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing:
        message = "browser test needs " + " and ".join(missing)
        if in_ci:
            pytest.fail(message)
        pytest.skip(message)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def test_ui_login_dags_run_grid_and_task_log(browser, stack, trained_run, predicted_run) -> None:
    from playwright.sync_api import expect

    IMGS.mkdir(exist_ok=True)
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    base = stack.base_url
    run_path = f"/dags/train_pipeline/runs/{urllib.parse.quote(trained_run.run_id, safe='')}"

    page.goto(base + "/")
    expect(page).to_have_url(re.compile(r"/auth/login"))
    page.get_by_label("Username").fill("airflow")
    page.get_by_label("Password").fill("airflow")
    expect(page.get_by_role("button", name="Sign in")).to_be_enabled()
    page.screenshot(path=IMGS / "login.png")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url)

    page.goto(base + "/dags")
    for dag_id in ("train_pipeline", "predict_pipeline"):
        expect(page.get_by_role("link", name=dag_id, exact=True)).to_be_visible()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=IMGS / "dag_list.png")

    page.goto(base + run_path)
    expect(page.get_by_text(trained_run.run_id).first).to_be_visible()
    for task_id in ("make_dataset", "preprocessing", "training"):
        expect(page.get_by_text(task_id, exact=True).first).to_be_visible()
    expect(page.get_by_text("Success").first).to_be_visible()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=IMGS / "train_run_grid.png")

    page.goto(base + run_path + "/tasks/training")
    # A line of the stage's own log, printed by the container and streamed into the log.
    expect(page.get_by_text(re.compile(r"read \d+ rows from")).first).to_be_visible()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=IMGS / "task_log.png")
    page.close()
