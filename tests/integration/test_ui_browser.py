"""The operator page in headless Chromium: log in, see versions and charts, roll a canary back."""

from __future__ import annotations

import os
import threading

import pytest
from werkzeug.serving import make_server

from control_plane import services
from control_plane.analysis.types import Phase
from control_plane.db.engine import make_engine, migrate
from control_plane.web import create_app
from tests.web_support import TOKEN, make_context, make_settings, seed_predictions

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
SCREENSHOT = os.environ.get("UI_SCREENSHOT", "/tmp/ui.png")


@pytest.fixture
def ctx(tmp_path):
    url = f"sqlite:///{tmp_path / 'cp.db'}"
    migrate(url)
    engine = make_engine(url)
    ctx = make_context(make_settings(tmp_path / "state", url), engine)
    services.start_canary(ctx, 3, None, "test")
    seed_predictions(engine, {"baseline": 1, "canary": 3, "control": 2}, minutes=30)
    services.evaluate(ctx, actor="test")
    yield ctx
    engine.dispose()


@pytest.fixture
def base_url(ctx):
    server = make_server("127.0.0.1", 0, create_app(ctx=ctx), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture
def page():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        yield page
        browser.close()


def test_an_operator_logs_in_sees_the_charts_and_rolls_the_canary_back(page, base_url, ctx):
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    rollout = ctx.ledger.active()

    page.goto(base_url + "/")
    page.click("text=Log in to operate")
    page.fill("input[name=password]", TOKEN)
    page.click("button:has-text('Log in')")
    page.wait_for_selector("#operate")

    assert page.locator("#versions tbody tr").count() == 3
    assert page.locator("#versions").inner_text().count("canary") >= 1
    page.wait_for_selector("#charts[data-loaded=true]", timeout=10_000)
    for chart in ("rps", "errors", "p99", "accuracy"):
        box = page.locator(f"#chart-{chart}").bounding_box()
        assert box and box["width"] > 100 and box["height"] > 100
    drawn = page.evaluate("Chart.getChart(document.getElementById('chart-p99')).data.datasets.length")
    assert drawn == 3
    page.screenshot(path=SCREENSHOT, full_page=True)

    dialogs: list[str] = []

    def accept(dialog):
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    rollback = page.locator("form:has(button:has-text('Roll back now'))")
    rollback.locator("input[name=reason]").fill("the canary's dashboards look wrong")
    rollback.locator("button").click()
    page.wait_for_selector(".flash-ok")

    assert dialogs and "Roll back canary v3" in dialogs[0]
    assert ctx.ledger.get(rollout.id).phase is Phase.ROLLED_BACK
    assert page.locator("#rollout-phase").inner_text() == "rolled_back"
    last = ctx.ledger.decisions(rollout.id, 1)[0]
    assert last["actor"] == "ui:operator" and last["action"] == "override_rollback", last
    assert "the canary's dashboards look wrong" in last["reason"], last
    assert problems == []


def test_dismissing_the_confirmation_changes_nothing(page, base_url, ctx):
    rollout = ctx.ledger.active()
    page.goto(base_url + "/login")
    page.fill("input[name=password]", TOKEN)
    page.click("button:has-text('Log in')")
    page.wait_for_selector("#operate")
    dismissed: list[str] = []
    page.on("dialog", lambda d: (dismissed.append(d.message), d.dismiss()))
    promote = page.locator("form:has(button:has-text('Promote now'))")
    promote.locator("input[name=reason]").fill("a test that changes its mind")
    promote.locator("button").click()
    page.wait_for_timeout(300)
    assert dismissed, "the confirmation was asked for"
    assert ctx.ledger.get(rollout.id).phase is Phase.PROGRESSING
