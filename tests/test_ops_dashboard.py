"""The dashboard in a real headless Chromium against running two-node deployments, and the JSON logs.

Two ``qkdstack node --log-format json`` processes per deployment, once without and once with an
eavesdropper (``intercept-resend:0.3``, every round aborts), and ``qkdstack dashboard --deployment DIR``
over both sites. Debian's ``chromium`` (installed by scripts/test.sh where missing) is driven through
Playwright's Python package with the system browser. The page must render without console errors,
show both sites and the node's QBER, and turn the eavesdropper's aborts into a visible alarm. The
screenshots stay in the test's temporary folder (``dashboard-clean.png``, ``dashboard-eve.png``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _node_support import deploy, free_base_port, status

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.slow


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the Python package playwright is not installed (pip install -e '.[test]')")
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (scripts/test.sh installs Debian's chromium as root)")
    return sync_playwright


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_deployment(out: Path, *, eve: str = "none", rounds: int = 2) -> Iterator[dict[str, Any]]:
    """Two node processes (JSON logs) and the deployment dashboard; all stopped on exit."""
    layouts = deploy(out, rounds=rounds, eve=eve, base_port=free_base_port(extra=1))
    base = int(layouts["A"].etsi_url.rsplit(":", 1)[1]) - 10
    procs: list[subprocess.Popen] = []
    try:
        for site in ("B", "A"):  # the receiver listens first
            log = open(out / f"{site}.log", "wb")  # noqa: SIM115 - closed below
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "qkdstack.cli", "node", "--config", str(layouts[site].config),
                 "--log-format", "json"], stdout=log, stderr=subprocess.STDOUT))
            log.close()
        dash = subprocess.Popen([sys.executable, "-m", "qkdstack.cli", "dashboard", "--deployment", str(out),
                                 "--listen", f"127.0.0.1:{base + 20}"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        procs.append(dash)
        deadline = time.monotonic() + 180
        while not all(status(out / s).get("finished") for s in "AB"):
            for proc in procs:
                assert proc.poll() is None, (proc.args, (out / "A.log").read_text()[-3000:])
            assert time.monotonic() < deadline, [status(out / s) for s in "AB"]
            time.sleep(0.3)
        yield {"layouts": layouts, "dashboard": f"http://127.0.0.1:{base + 20}/", "procs": procs}
    finally:
        _stop(procs)


def _render(sync_playwright: Any, url: str, shot: Path, wait_for: str) -> tuple[dict[str, Any], list[str]]:
    """Load the page, wait for ``wait_for``, take a screenshot; returns DOM facts and console errors."""
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']", timeout=20_000)
            page.wait_for_selector(wait_for, timeout=20_000)
            page.screenshot(path=str(shot), full_page=True)
            facts = page.evaluate("""() => ({
                sites: [...document.querySelectorAll('article.site[data-site]')].map(e => e.dataset.site),
                charts: [...document.querySelectorAll('svg.qber-chart')].map(e => e.id),
                qber: Object.fromEntries([...document.querySelectorAll('article.site[data-site]')].map(e =>
                    [e.dataset.site, Object.fromEntries([...e.querySelectorAll('.qber-value')].map(
                        q => [q.dataset.basis, q.dataset.value]))])),
                seriesX: document.querySelectorAll('svg.qber-chart polyline.series-qber_x').length,
                threshold: document.querySelectorAll('svg.qber-chart line.threshold').length,
                alarms: [...document.querySelectorAll('#alarms .alarm')].map(e => e.textContent),
                alarmed: [...document.querySelectorAll('article.site.alarmed')].map(e => e.dataset.site),
                abortPoints: document.querySelectorAll('svg.qber-chart circle.abort-point').length,
                alarmVisible: (() => { const a = document.querySelector('#alarms .alarm');
                    if (!a) return false; const r = a.getBoundingClientRect();
                    return r.width > 0 && r.height > 0 && getComputedStyle(a).visibility !== 'hidden'; })(),
                mapLinks: document.querySelectorAll('#network-map line.map-link').length,
            })""")
        finally:
            browser.close()
    return facts, errors


def _json_log(path: Path) -> list[dict[str, Any]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines
    return [json.loads(line) for line in lines]  # every line is one JSON object


def test_dashboard_and_json_logs_without_and_with_an_eavesdropper(tmp_path: Path) -> None:
    sync_playwright = _playwright()

    # Without an eavesdropper: both sites, the node's QBER, no alarm.
    out = tmp_path / "clean"
    with running_deployment(out) as run:
        st = {s: status(out / s) for s in "AB"}
        facts, errors = _render(sync_playwright, run["dashboard"], tmp_path / "dashboard-clean.png",
                                "svg.qber-chart polyline.series-qber_x")
        assert errors == []
        assert facts["sites"] == ["A", "B"] and facts["charts"] == ["qber-chart-A", "qber-chart-B"]
        for site in "AB":
            assert float(facts["qber"][site]["X"]) == st[site]["last_round"]["qber_x"]
            assert float(facts["qber"][site]["Z"]) == st[site]["last_round"]["qber_z"]
        assert facts["seriesX"] == 2 and facts["threshold"] == 2 and facts["mapLinks"] == 1
        assert facts["alarms"] == [] and facts["alarmed"] == [] and facts["abortPoints"] == 0
        # A node's own admin listener serves the same page for its site.
        node_facts, node_errors = _render(sync_playwright, run["layouts"]["A"].admin_url + "/",
                                          tmp_path / "node-A.png", "svg.qber-chart")
        assert node_errors == [] and node_facts["sites"] == ["A"]
    assert (tmp_path / "dashboard-clean.png").stat().st_size > 10_000
    for site in "AB":
        records = _json_log(out / f"{site}.log")
        assert {r["site"] for r in records} == {site} and {r["link"] for r in records} == {"A-B"}
        events = {r["event"] for r in records}
        assert {"etsi014.listening", "admin.listening", "peer.authenticated"} <= events, events
        assert all({"time", "level", "event", "site", "link", "round", "message"} <= r.keys() for r in records)
        assert any(r["event"] == "peer.authenticated" and r["round"] is not None for r in records)

    # With an eavesdropper: every round aborts; the page shows a visible alarm and red abort points.
    out = tmp_path / "eve"
    with running_deployment(out, eve="intercept-resend:0.3") as run:
        st = status(out / "A")
        assert st["rounds_accepted"] == 0 and st["rounds_aborted"] == 2
        facts, errors = _render(sync_playwright, run["dashboard"], tmp_path / "dashboard-eve.png", "#alarms .alarm")
        assert errors == []
        assert facts["sites"] == ["A", "B"]
        assert facts["alarmVisible"] and sorted(facts["alarmed"]) == ["A", "B"]
        assert any("ALARM A: 2 of the last 2 rounds aborted" in a for a in facts["alarms"]), facts["alarms"]
        assert facts["abortPoints"] == 4
    aborted = [r for r in _json_log(out / "A.log") if r["event"] == "round.aborted"]
    assert len(aborted) == 2 and all(r["level"] == "warning" and r["round"] for r in aborted)
    with contextlib.suppress(urllib.error.URLError, ConnectionError):  # the dashboard process is stopped
        urllib.request.urlopen(run["dashboard"], timeout=2)
        pytest.fail("the dashboard still answers after the test stopped it")
