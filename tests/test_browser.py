"""The UI in a real browser: Debian's Chromium driven by Playwright, against the app served over
HTTP. Temporal is a closed port, so confirm saves the row and says the workflow did not start.

Needs `apt-get install -y chromium` and the `playwright` package (requirements-dev.txt); the
browser is never downloaded (`playwright install` is not used). Screenshots go to the test's
tmp dir for a human to look at."""
from __future__ import annotations

import os

import pytest

from tests.conftest import ADMIN, TEST_PASSWORD, served, web_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -r requirements-dev.txt)")
pytestmark = [
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"),
    pytest.mark.timeout(180),
]


@pytest.fixture
def base_url(tmp_path):
    apps = web_app(tmp_path)
    app = next(apps)
    try:
        with served(app) as url:
            yield url
    finally:
        next(apps, None)  # the app fixture's cleanup


def sign_in(page, base_url: str, name: str = ADMIN, password: str = TEST_PASSWORD) -> None:
    """Through the login form, as a person does; every page asks for it first."""
    page.goto(f"{base_url}/endpoints")
    page.wait_for_url(f"{base_url}/login?next=/endpoints")
    page.fill("#name", name)
    page.fill("#password", password)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{base_url}/endpoints")


@pytest.fixture
def page(base_url):  # after the server, so the browser closes before it stops
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.set_default_timeout(20_000)
            sign_in(page, base_url)
            yield page
        finally:
            browser.close()


def test_server_endpoint_form_review_confirm(page, base_url, tmp_path):
    page.goto(f"{base_url}/endpoints/new")
    assert page.locator("#routes-fieldset").is_hidden()  # the script shows only the chosen source
    page.fill("#name", "web1")
    page.fill("#start_command", "python -m http.server $PORT")
    page.click("button:has-text('Review')")
    page.wait_for_selector("h1:has-text('Review: web1')")
    assert "python -m http.server $PORT" in page.inner_text("dl.spec")
    page.click("button:has-text('Create endpoint')")
    page.wait_for_url(f"{base_url}/endpoints/web1")
    assert page.inner_text("h1") == "web1"
    assert "Temporal is not reachable" in page.inner_text(".flash-error")  # saved all the same
    assert "curl http://127.0.0.1:8000/e/web1/" in page.inner_text("pre.code")
    page.screenshot(path=str(tmp_path / "detail.png"), full_page=True)


def _add_route(page, path, file, function):
    page.click("button.add-route")
    route = page.locator(".route").last
    route.locator('[data-field="path"]').fill(path)
    route.locator('[data-field="file"]').fill(file)
    route.locator('[data-field="function"]').fill(function)
    return route


def _add_param(route, name, kind, **constraints):
    route.locator("button.add-param").click()
    param = route.locator(".param").last
    param.locator('[data-field="name"]').fill(name)
    param.locator('[data-field="type"]').select_option(kind)
    for key, value in constraints.items():
        param.locator(f'[data-field="{key}"]').fill(value)
    return param


def test_routes_editor_builds_routes_and_keeps_them_after_an_error(page, base_url, tmp_path):
    page.goto(f"{base_url}/endpoints/new")
    page.fill("#name", "calc")
    page.select_option("#source_kind", "routes")
    assert page.locator("#routes-fieldset").is_visible() and page.locator("#start_command").is_hidden()
    assert page.locator("#routes_json").is_hidden()  # the editor replaces the JSON textarea
    page.fill("#git_url", "https://example.com/calc.git")
    page.fill("#git_ref", "main")

    route = _add_route(page, "/predict", "../predict.py", "predict")
    _add_param(route, "text", "str", max_length="512", choices="")
    _add_param(route, "count", "int", ge="0", le="10")
    # Constraints that do not apply to the type are hidden.
    assert route.locator(".param").last.locator('[data-field="regex"]').is_hidden()
    second = _add_route(page, "/square", "calc.py", "square")
    second.locator('[data-field="method"]').select_option("GET")
    _add_param(second, "x", "float")
    second.locator(".param").last.locator("button.remove-param").click()
    page.locator("#routes-fieldset").screenshot(path=str(tmp_path / "routes_editor.png"))
    page.screenshot(path=str(tmp_path / "form_routes.png"), full_page=True)

    # The JSON view shows what will be sent; back in the editor nothing is lost.
    page.click("button:has-text('Edit as JSON')")
    assert '"path": "/predict"' in page.input_value("#routes_json") and page.locator("#routes-editor").is_hidden()
    page.click("button:has-text('Use the routes editor')")
    assert page.locator(".route").count() == 2 and page.locator("#routes_json").is_hidden()

    # A bad file comes back beside its input, with everything typed still there.
    page.click("button:has-text('Review')")
    page.wait_for_selector(".route .has-error")
    first = page.locator(".route").first
    assert first.locator('[data-field="file"]').input_value() == "../predict.py"
    assert "stay inside the source" in first.locator("label.has-error").inner_text()
    assert first.locator(".param").count() == 2
    assert first.locator(".param").last.locator('[data-field="le"]').input_value() == "10"
    assert page.locator(".route").count() == 2 and page.locator(".route").last.locator(".param").count() == 0
    assert page.input_value("#git_url") == "https://example.com/calc.git"
    assert page.locator("#route-errors").is_hidden()  # every message found its input
    page.locator("#routes-fieldset").screenshot(path=str(tmp_path / "routes_editor_error.png"))

    first.locator('[data-field="file"]').fill("predict.py")
    page.click("button:has-text('Review')")
    page.wait_for_selector("h1:has-text('Review: calc')")
    listing = page.inner_text("table.routes")
    assert "/predict" in listing and "predict.py:predict" in listing
    assert "text: str, required, length ≤ 512" in listing and "count: int, required, 0 ≤ value ≤ 10" in listing
    assert "GET\t/square\tcalc.py:square" in listing
    page.screenshot(path=str(tmp_path / "review.png"), full_page=True)

    page.click("button:has-text('Create endpoint')")
    page.wait_for_url(f"{base_url}/endpoints/calc")
    curls = page.locator("pre.route-curl").all_inner_texts()
    assert curls == [
        "curl -X POST -H 'Content-Type: application/json' -d '{\"text\": \"text\", \"count\": 1}' "
        "http://127.0.0.1:8000/e/calc/predict",
        "curl http://127.0.0.1:8000/e/calc/square",
    ]
    page.screenshot(path=str(tmp_path / "detail_routes.png"), full_page=True)
