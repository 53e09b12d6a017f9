"""The dashboard end to end: a real `ccproxy serve`, seeded usage rows, headless Chromium (Playwright).

Logs in with the form and with a one-time link from `ccproxy dashboard`, reads the numbers on the
page (summary tiles, chart data, table cells), changes the time range, opens the request log and
the live panel, and checks that without the admin key the page and the API answer 401. Screenshots
(wide 1400 px and narrow 420 px) go to test-artifacts/.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from helpers.procs import REPO, SETUP_HINT, FakeBackend
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from ccproxy.usage.sqlite import SQLiteStore

sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))
from test_ui_api import ADMIN, USER, seed_rows  # noqa: E402

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[int]:
    """The fake backend (its own process), listing one model, m1: its port."""
    fake = FakeBackend(tmp_path / "backend", models=("m1",))
    fake.start()
    yield fake.port
    fake.stop()


@pytest.fixture
def seeded_gateway(gateway, backend: int, tmp_path: Path):
    db = tmp_path / "usage.db"

    async def seed() -> None:
        store = SQLiteStore(db)
        await store.start()
        await store.insert_usage(seed_rows(time.time()))
        await store.close()

    asyncio.run(seed())
    return gateway({
        "admin_key": ADMIN,
        "keys": [{"name": "alice", "key": USER, "rpm": 10, "tpm": 1000}],
        "providers": {"up": {"type": "openai", "base_url": f"http://127.0.0.1:{backend}/v1"},
                      "down": {"type": "openai", "base_url": "http://127.0.0.1:1/v1", "timeouts": {"connect": 0.5}}},
        "models": {"coding": {"provider": "up", "model": "m1"},
                   "fast": {"provider": "down", "model": "gpt-x"}},
        "database": str(db),
    })


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium, or {SETUP_HINT}", pytrace=False)
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        await b.close()


def watch(page: Page) -> list[str]:
    """Console errors and page errors (a CSP violation would show up here)."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" and "401" not in m.text else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems


async def until(page: Page, expression: str, timeout: float = 15.0) -> None:
    """Poll a JS expression from Python (page.wait_for_function evaluates strings with eval(), which
    the dashboard's Content-Security-Policy rightly forbids)."""
    deadline = time.monotonic() + timeout
    while not await page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout} s: {expression}")
        await asyncio.sleep(0.05)


async def loaded(page: Page, tab: str) -> None:
    await until(page, f"document.body.dataset.loaded === {tab!r} && !document.body.classList.contains('loading')")


async def text(page: Page, selector: str) -> str:
    return (await page.locator(selector).inner_text()).strip()


async def table(page: Page, selector: str) -> list[list[str]]:
    return await page.eval_on_selector_all(
        f"{selector} tbody tr", "rows => rows.map(r => Array.from(r.cells).map(c => c.innerText.trim()))")


async def chart_sum(page: Page, chart: str, dataset: int) -> float:
    return await page.evaluate(
        f"Chart.getChart({chart!r}).data.datasets[{dataset}].data.reduce((a, b) => a + (b || 0), 0)")


async def new_page(browser: Browser, width: int) -> tuple[BrowserContext, Page]:
    ctx = await browser.new_context(viewport={"width": width, "height": 900}, device_scale_factor=1)
    return ctx, await ctx.new_page()


async def test_dashboard_in_chromium(seeded_gateway, browser: Browser) -> None:
    gw = seeded_gateway
    ARTIFACTS.mkdir(exist_ok=True)

    # ------------------------------------------------ without the admin key: 401 and the login form
    ctx, page = await new_page(browser, 1400)
    problems = watch(page)
    resp = await page.goto(f"{gw.url}/ui")
    assert resp is not None and resp.status == 401
    assert await page.locator("input#key[type=password]").is_visible()
    api = await page.evaluate("""async () => Promise.all(
        ['/ui/api/usage', '/ui/api/timeseries', '/ui/api/requests', '/ui/api/live']
        .map(p => fetch(p).then(r => r.status)))""")
    assert api == [401, 401, 401, 401]
    await page.screenshot(path=str(ARTIFACTS / "dashboard-login.png"))
    await page.fill("#key", USER)  # a valid key, but not the admin's
    await page.click("button[type=submit]")
    assert "That is not the admin key." in await text(page, ".login-error")

    # ------------------------------------------------ log in with the admin key
    await page.fill("#key", ADMIN)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{gw.url}/ui")
    await loaded(page, "overview")
    cookie = next(c for c in await ctx.cookies() if c["name"] == "ccproxy_ui")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != ADMIN
    assert "ccproxy_ui" not in await page.evaluate("document.cookie")  # HttpOnly: not visible to scripts

    # default range: 24 h -> 8 of the 9 seeded requests
    assert await text(page, "#t-requests") == "8"
    assert await text(page, "#t-range") == "last 24 h"

    # ------------------------------------------------ 1 h: the exact numbers of the seed
    await page.click("#range button[data-range='3600']")
    await until(page, "document.querySelector('#t-range').textContent === 'last 1 h'")
    await loaded(page, "overview")
    tiles = {t: await text(page, f"#t-{t}") for t in ("requests", "errors", "input", "output", "p50", "p95", "ttfb",
                                                       "cost", "cost-per")}
    # percentiles: histogram estimates of the exact 300 ms, 1.70 s, 150 ms (within 3.9 %)
    assert tiles == {"requests": "7", "errors": "3", "input": "380", "output": "165", "p50": "311.0 ms",
                     "p95": "1.68 s", "ttfb": "147.0 ms", "cost": "$0.00300", "cost-per": "$0.000429 per request"}
    assert await text(page, "#t-error-rate") == "42.9% of requests"
    assert await chart_sum(page, "chart-requests", 0) == 4  # succeeded
    assert await chart_sum(page, "chart-requests", 1) == 3  # errors
    assert await chart_sum(page, "chart-tokens", 0) == 380
    assert await chart_sum(page, "chart-tokens", 1) == 165
    assert await page.evaluate("Chart.getChart('chart-latency').data.labels") == ["coding", "fast"]
    assert await page.evaluate("Chart.getChart('chart-latency').data.datasets.map(d => d.data)") == [
        [986.6, 98], [1873.6, 289.7], [196, 49]]
    canvas = await page.locator("#chart-requests").bounding_box()
    assert canvas is not None and canvas["width"] > 300 and canvas["height"] > 150
    by_key = await table(page, "#breakdown")
    assert by_key == [["alice", "4", "1", "320", "160", "$0.00300", "740.1 ms", "1.82 s", "196.0 ms", "55.0"],
                      ["bob", "3", "2", "60", "5", "–", "98.0 ms", "289.7 ms", "49.0 ms", "–"]]
    await page.click("#by button[data-by='session']")
    await until(page, "document.querySelector('#breakdown-group').textContent === 'Session'")
    await loaded(page, "overview")
    assert [r[:6] for r in await table(page, "#breakdown")] == [["sess-a", "2", "0", "220", "110", "$0.000500"],
                                                                ["(none)", "5", "3", "160", "55", "$0.00250"]]
    await page.click("#by button[data-by='tag']")
    await page.fill("#tag-input", "team")
    await page.click("#tag-form button[type=submit]")
    await until(page, "document.querySelector('#breakdown-group').textContent === 'Tag team'")
    await loaded(page, "overview")
    assert [r[:3] for r in await table(page, "#breakdown")] == [["infra", "4", "1"], ["(none)", "3", "2"]]
    await page.click("#by button[data-by='alias']")
    await until(page, "document.querySelector('#breakdown-group').textContent === 'Alias'")
    await loaded(page, "overview")
    assert [r[:3] for r in await table(page, "#breakdown")] == [["coding", "3", "0"], ["fast", "3", "2"],
                                                                ["(none)", "1", "1"]]
    await page.screenshot(path=str(ARTIFACTS / "dashboard-wide.png"), full_page=True)

    # ------------------------------------------------ 7 d, then a custom range of 3 h
    await page.click("#range button[data-range='604800']")
    await until(page, "document.querySelector('#t-requests').textContent === '9'")
    await page.click("#range button[data-range='custom']")
    await page.fill("#custom-input", "3h")
    await page.click("#custom-form button[type=submit]")
    await until(page, "document.querySelector('#t-range').textContent === 'last 3 h'")
    await until(page, "document.querySelector('#t-requests').textContent === '8'")
    await page.fill("#custom-input", "yesterday")
    await page.click("#custom-form button[type=submit]")
    assert "use e.g. 30m" in await text(page, "#custom-error")

    # ------------------------------------------------ the request log
    await page.click("a.tab[data-tab='requests']")
    await loaded(page, "requests")
    rows = await table(page, "#requests")
    assert len(rows) == 9
    assert rows[0][1:7] == ["alice", "coding", "–", "up", "m1", "200"]
    assert rows[0][7:] == ["20", "10", "500.0 ms", "100.0 ms", "yes"]
    assert rows[1][3] == "big-prompt"
    assert rows[3][6] == "500 upstream_error"
    await page.screenshot(path=str(ARTIFACTS / "dashboard-requests-wide.png"), full_page=True)

    # ------------------------------------------------ the live panel
    await page.click("a.tab[data-tab='live']")
    await loaded(page, "live")
    providers = {r[0]: r for r in await table(page, "#providers")}
    assert providers["up"][:4] == ["up", "openai", "yes", "1"] and providers["down"][2] == "no"
    deployments = {r[0]: r for r in await table(page, "#deployments")}
    assert deployments["up"][1:4] == ["m1", "coding", "ready"]
    assert deployments["down"][3] == "unreachable"
    keys = await table(page, "#keys")
    assert keys[0][:5] == ["alice", "config", "0 / 10", "0 / 1,000", "0"]
    assert await text(page, "#g-up") == "1 / 2"
    await page.screenshot(path=str(ARTIFACTS / "dashboard-live-wide.png"), full_page=True)

    # ------------------------------------------------ log out: back to 401
    await page.click(".logout button")
    await page.wait_for_selector("input#key")
    assert await page.evaluate("fetch('/ui/api/live').then(r => r.status)") == 401
    assert problems == []
    await ctx.close()


async def test_one_time_link_and_narrow_window(seeded_gateway, browser: Browser) -> None:
    gw = seeded_gateway
    ARTIFACTS.mkdir(exist_ok=True)
    done = subprocess.run([str(REPO / ".venv/bin/ccproxy"), "dashboard", "--config", str(gw.config_path), "--no-open"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip()
    assert link.startswith(f"{gw.url}/ui/login?token=") and "one-time login link" in done.stderr
    assert ADMIN not in done.stdout

    ctx, page = await new_page(browser, 420)
    problems = watch(page)
    await page.goto(link)
    await page.wait_for_url(f"{gw.url}/ui")
    await loaded(page, "overview")
    assert await text(page, "#t-requests") == "8"
    await page.click("#range button[data-range='3600']")
    await until(page, "document.querySelector('#t-requests').textContent === '7'")
    await loaded(page, "overview")
    # nothing wider than the window but the scrollable tables
    overflow = await page.evaluate("document.documentElement.scrollWidth")
    assert overflow <= 420
    await page.screenshot(path=str(ARTIFACTS / "dashboard-narrow.png"), full_page=True)
    await page.click("a.tab[data-tab='requests']")
    await loaded(page, "requests")
    assert len(await table(page, "#requests")) == 9
    await page.screenshot(path=str(ARTIFACTS / "dashboard-requests-narrow.png"), full_page=True)
    assert problems == []
    await ctx.close()

    # the link was single use
    ctx, page = await new_page(browser, 420)
    resp = await page.goto(link)
    assert resp is not None and resp.status == 401
    assert "already used or expired" in await text(page, ".login-error")
    await ctx.close()
