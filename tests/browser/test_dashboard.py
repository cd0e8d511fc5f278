"""The web dashboard in headless Chromium: it renders what the API says, live, offline.

Needs Debian's Chromium at /usr/bin/chromium (``bash scripts/ensure-chromium.sh``), driven
through Playwright's Python package; ``playwright install`` is never used.

The server behind ``dashboard_url`` is live (numbers change on every call), so exact
comparisons use the very responses the page rendered: auto-refresh is switched off, a
"Refresh now" round is captured with ``expect_response``, and the DOM is compared with
those bodies. ``live_values()`` (fetched over HTTP by the test itself) checks what must
hold whatever the timing: the same endpoints and components, a request counter that
never goes back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

# The timeout covers the live stack starting (module fixture) as well as the page.
pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(120)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PANELS = [
    "status",
    "weights",
    "weight-history",
    "load",
    "endpoints",
    "training",
    "loss-history",
    "timeline",
    "decisions",
]
CANVASES = ["weights-chart", "weight-history-chart", "load-chart", "training-chart", "loss-chart", "timeline-chart"]
COMPONENTS = ["controller", "policy", "xds", "envoy", "prometheus"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
LOCAL_SCHEMES = {"data", "blob", "about"}
DASH = "\u2014"
SCREENSHOT = Path(__file__).resolve().parents[2] / "artifacts" / "dashboard.png"
STEP_MS = 10_000  # any single wait in the page


def js_fixed(value: float | None, digits: int) -> str:
    """``Number.prototype.toFixed`` as the page uses it: ties on the exact binary value
    round away from zero (Python's format rounds half to even), None -> the dash."""
    if value is None:
        return DASH
    return str(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def as_int(text: str | None) -> int:
    assert text is not None
    return int(text.strip().replace(",", ""))


@contextmanager
def dashboard_page(url: str) -> Iterator[tuple[Any, list[str], list[str]]]:
    """A headless Chromium page on ``url``; yields (page, console errors, request URLs)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/ensure-chromium.sh` (installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=STEP_MS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(STEP_MS)
            page.set_default_navigation_timeout(STEP_MS)
            page.on(
                "console",
                lambda m: errors.append(f"console.error: {m.text} at {m.location}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url + "/", wait_until="load")
            yield page, errors, requests
        finally:
            browser.close()


def stamps(page: Any) -> list[str | None]:
    return page.evaluate("ids => ids.map(id => document.getElementById(id).dataset.updated || null)", PANELS)


def wait_idle(page: Any) -> None:
    page.wait_for_function("() => !document.getElementById('refresh-now').hasAttribute('aria-busy')")


def wait_all_changed(page: Any, old: list[str | None], panels: list[str] = PANELS) -> None:
    page.wait_for_function(
        """([ids, all, old]) => ids.every(id => {
             const v = document.getElementById(id).dataset.updated;
             return v && v !== old[all.indexOf(id)];
           })""",
        arg=[panels, PANELS, old],
    )


def refresh_and_capture(page: Any) -> dict[str, Any]:
    """Click "Refresh now" with auto-refresh off; return the API bodies that round rendered."""
    wait_idle(page)
    old = stamps(page)
    with (
        page.expect_response(lambda r: urlsplit(r.url).path == "/api/weights") as weights,
        page.expect_response(lambda r: urlsplit(r.url).path == "/api/status") as status,
        page.expect_response(lambda r: urlsplit(r.url).path == "/api/decisions") as decisions,
        page.expect_response(lambda r: urlsplit(r.url).path == "/api/timeline") as timeline,
    ):
        page.click("#refresh-now")
    wait_all_changed(page, old)
    wait_idle(page)
    return {
        "weights": weights.value.json(),
        "status": status.value.json(),
        "decisions": decisions.value.json(),
        "timeline": timeline.value.json(),
    }


def test_dashboard_renders_live_api_values(dashboard_url: str, live_values: Callable[[], dict[str, Any]]) -> None:
    before = live_values()
    with dashboard_page(dashboard_url) as (page, errors, requests):
        # Every panel renders from a successful fetch.
        page.wait_for_function("ids => ids.every(id => document.getElementById(id).dataset.updated)", arg=PANELS)
        assert page.title() == "BalanceIQ \u2014 Traffic Routing Dashboard"

        # Freeze the page on one captured round; clicking refresh-now must re-render every panel.
        page.uncheck("#auto-refresh")
        first = stamps(page)
        api = refresh_and_capture(page)
        assert all(new != old for new, old in zip(stamps(page), first, strict=True)), "refresh-now changed nothing"
        assert page.locator("#error-banner").is_hidden()

        # Status tiles: the API's state and reason for every component.
        status = api["status"]
        assert set(status["components"]) >= set(COMPONENTS)
        assert set(before["status"]["components"]) == set(status["components"])
        for name in COMPONENTS:
            tile = page.locator(f'[data-testid="status-{name}"]')
            comp = status["components"][name]
            assert tile.locator('[data-field="state"]').text_content() == comp["state"], name
            assert tile.get_attribute("data-state") == comp["state"], name
            assert tile.locator('[data-field="reason"]').text_content() == (comp.get("reason") or DASH), name
        assert page.locator("#status-mode").text_content() == status["mode"]
        assert page.locator("#overall-state").text_content() == status["overall"]

        # Weights list and endpoints table: every endpoint the API reports, with its numbers.
        weights = api["weights"]
        endpoints = weights["endpoints"]
        assert endpoints, "the API reports no endpoints"
        assert {e["address"] for e in before["weights"]["endpoints"]} == {e["address"] for e in endpoints}
        assert page.locator('[data-testid="weight-row"]').count() == len(endpoints)
        for ep in endpoints:
            addr = ep["address"]
            row = page.locator(f'[data-testid="weight-row"][data-address="{addr}"]')
            assert row.count() == 1, addr
            assert addr in (row.text_content() or "")
            assert as_int(row.locator('[data-testid="weight-value"]').text_content()) == ep["weight"], addr
            share = row.locator('[data-testid="weight-share"]').text_content()
            assert share == (DASH if ep["share"] is None else js_fixed(ep["share"] * 100, 1) + "%"), addr

            tr = page.locator(f'#endpoints-table tr[data-address="{addr}"]')
            assert tr.count() == 1, addr
            assert tr.locator('[data-field="p95_ms"]').text_content() == js_fixed(ep["p95_ms"], 1), addr
            assert tr.locator('[data-field="rps"]').text_content() == js_fixed(ep["rps"], 1), addr
            assert tr.locator('[data-field="cloud"]').text_content() == ep["cloud"], addr
            assert tr.locator('[data-field="region"]').text_content() == ep["region"], addr

        # Total requests: exactly what the page was sent, never less than before the page loaded.
        # (null while the API cannot tell, e.g. Envoy's admin is unreachable: then the dash.)
        shown = page.locator("#total-requests").text_content()
        if weights["total_requests"] is None:
            assert shown == DASH
        else:
            assert as_int(shown) == weights["total_requests"]
            if before["weights"]["total_requests"] is not None:
                assert as_int(shown) >= before["weights"]["total_requests"]

        # Latency and cost: the saving against equal weights the API computed, as shown.
        t = api["timeline"]
        assert t["points"], "the timeline has no points"
        saving = page.locator('[data-testid="saving-vs-equal"]').text_content()
        assert saving == (DASH if t["saving_vs_equal"] is None else js_fixed(t["saving_vs_equal"] * 100, 1) + "%")

        # Charts drew into real canvases.
        for canvas_id in CANVASES:
            box = page.locator(f"#{canvas_id}").bounding_box()
            assert box is not None and box["width"] > 0 and box["height"] > 0, canvas_id
            size = page.evaluate(
                "id => [document.getElementById(id).width, document.getElementById(id).height]", canvas_id
            )
            assert size[0] > 0 and size[1] > 0, canvas_id

        # Decision log: newest first, at most 20, the same decisions the API returned.
        seqs = [
            int(s)
            for s in page.eval_on_selector_all(
                "#decisions-table tbody tr[data-seq]", "rows => rows.map(r => r.dataset.seq)"
            )
        ]
        assert seqs, "the decision table has no rows"
        assert len(seqs) <= 20
        assert seqs == sorted(seqs, reverse=True)
        assert seqs == sorted((d["seq"] for d in api["decisions"]["decisions"]), reverse=True)[:20]

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        assert not errors, "errors in the page:\n" + "\n".join(errors)
        outside = [
            u for u in requests if urlsplit(u).scheme not in LOCAL_SCHEMES and urlsplit(u).hostname not in LOOPBACK
        ]
        assert not outside, f"the page requested non-loopback URLs: {outside}"
        # It did fetch its own assets (no CDN), which proves the list above is not empty by accident.
        paths = {urlsplit(u).path for u in requests}
        assert {"/static/vendor/chart.umd.min.js", "/static/dashboard.js", "/static/dashboard.css"} <= paths


def test_dashboard_names_failing_url_and_recovers(dashboard_url: str) -> None:
    with dashboard_page(dashboard_url) as (page, errors, _requests):
        page.wait_for_function("ids => ids.every(id => document.getElementById(id).dataset.updated)", arg=PANELS)
        page.uncheck("#auto-refresh")
        wait_idle(page)
        assert not errors, "errors in the page:\n" + "\n".join(errors)

        # One endpoint fails: its panel goes stale and the banner names the URL; the rest update.
        page.route("**/api/decisions*", lambda route: route.fulfill(status=503, body="injected failure"))
        rows_before = page.locator("#decisions-table tbody tr[data-seq]").count()
        old = stamps(page)
        page.click("#refresh-now")
        banner = page.locator("#error-banner")
        banner.wait_for(state="visible")
        assert "/api/decisions" in (banner.text_content() or "")
        assert "503" in (banner.text_content() or "")
        wait_all_changed(page, old, [p for p in PANELS if p != "decisions"])
        wait_idle(page)
        assert page.locator("#decisions").get_attribute("data-stale") == "true"
        assert page.locator("#decisions").get_attribute("data-updated") == old[PANELS.index("decisions")]
        assert page.locator("#decisions-table tbody tr[data-seq]").count() == rows_before, "last good rows kept"

        # It comes back: the banner goes away and the panel updates again.
        page.unroute("**/api/decisions*")
        old = stamps(page)
        page.click("#refresh-now")
        wait_all_changed(page, old)
        banner.wait_for(state="hidden")
        assert page.locator("#decisions").get_attribute("data-stale") == "false"

        # The only console errors are Chromium's own report of the injected 503.
        unexpected = [e for e in errors if "503" not in e]
        assert not unexpected, "errors in the page:\n" + "\n".join(unexpected)


def test_cluster_selector_switches_every_panel_to_the_chosen_cluster(two_cluster_url: str) -> None:
    with dashboard_page(two_cluster_url) as (page, errors, requests):
        page.wait_for_function("ids => ids.every(id => document.getElementById(id).dataset.updated)", arg=PANELS)
        page.uncheck("#auto-refresh")
        wait_idle(page)
        select = page.locator("#cluster-select")
        assert select.is_visible() and select.input_value() == "my_service"
        options = page.eval_on_selector_all("#cluster-select option", "os => os.map(o => o.value)")
        assert options == ["my_service", "checkout"]
        import httpx

        wanted = [
            e["address"] for e in httpx.get(two_cluster_url + "/api/weights?cluster=checkout").json()["endpoints"]
        ]
        first = [e["address"] for e in httpx.get(two_cluster_url + "/api/weights").json()["endpoints"]]
        assert set(wanted).isdisjoint(first)

        old = stamps(page)
        with page.expect_response(lambda r: urlsplit(r.url).path == "/api/weights" and "cluster=checkout" in r.url):
            select.select_option("checkout")
        wait_all_changed(page, old, [p for p in PANELS if p not in ("training", "loss-history")])
        wait_idle(page)
        shown = page.eval_on_selector_all("#weights-list li[data-address]", "ls => ls.map(l => l.dataset.address)")
        assert shown == wanted
        assert "cluster=checkout" in page.url
        assert page.locator("#decisions-table tbody tr[data-seq]").count() > 0
        scoped = [u for u in requests if urlsplit(u).path in ("/api/status", "/api/timeline", "/api/decisions")]
        assert any("cluster=checkout" in u for u in scoped)
        assert not errors, "errors in the page:\n" + "\n".join(errors)
