"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright's
Python package; never ``playwright install``): the counts after a known workload, a failure
with its traceback, no error in the browser's console. Saves the screenshot docs/operating.md shows
(``TASKORCH_SCREENSHOT=docs/dashboard.png`` writes it there too)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import _tasks as T
import pytest
from _tasks import scaled

from taskorch import Policy, TaskOrchestrator
from taskorch._service.server.http import HttpService

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
R = scaled(30)  # deadline for any one result: only catches deadlocks

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is missing (apt-get install chromium)")


def test_dashboard_shows_counts_workers_and_a_failure_with_its_traceback(
    make_orchestrator: Callable[..., TaskOrchestrator], tmp_path: Path,
) -> None:
    from playwright.sync_api import expect, sync_playwright

    o = make_orchestrator(worker_count=2, policy=Policy())
    # Samples every 0.1 s, so that the charts have a shape after a second of work.
    service = HttpService(o, "127.0.0.1", 0, token="dashboard-token", sample_interval=0.1)
    service.start()
    try:
        # Waves of short tasks, each followed by two samples (a handshake with the sampler).
        done = 0
        for wave in (1, 3, 6, 4, 8, 2, 5, 1):
            n = wave * 15
            futures = [o.run(T.busy_identity, i, 0.004) for i in range(n)]
            assert [f.result(timeout=R) for f in futures if f] == list(range(n))
            done += n
            seen = len(service.history)
            T.wait_until(lambda: len(service.history) >= seen + 2, what="two samples")
        schedule = o.schedule(T.square, every=3600, args=(7,), name="hourly-square")
        triggered = schedule.trigger()
        assert triggered and triggered.result(timeout=R) == 49
        futures = [o.run(T.square, i) for i in range(20)]
        failing = o.run(T.raise_value_error, "disk quota exceeded")
        assert [f.result(timeout=R) for f in futures if f] == [i * i for i in range(20)]
        assert failing and isinstance(failing.exception(timeout=R), ValueError)
        T.wait_until(lambda: o.schedules()[0].last_success is not None, what="the schedule")
        stats = o.stats()
        assert (stats.succeeded, stats.failed) == (done + 21, 1)

        console: list[str] = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}")
                        if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
                page.goto(service.url + "#token=dashboard-token")
                expect(page.locator("#count-succeeded")).to_have_text(str(done + 21),
                                                                      timeout=R * 1000)
                expect(page.locator("#count-failed")).to_have_text("1")
                expect(page.locator("#count-submitted")).to_have_text(str(done + 22))
                expect(page.locator("#breaker")).to_have_text("closed")
                expect(page.locator("#ready")).to_have_text("yes")
                failure = page.locator("#failures details.failure")
                expect(failure).to_have_count(1)
                expect(failure.locator("summary")).to_have_text(
                    "ValueError: disk quota exceeded")
                failure.locator("summary").click()
                expect(failure.locator("pre")).to_contain_text("raise ValueError(message)")
                expect(page.locator("#failures")).to_contain_text("_tasks.raise_value_error")
                workers = page.locator("#workers tbody tr")
                expect(workers).to_have_count(2)
                for pid in o.worker_pids():
                    expect(page.locator("#workers")).to_contain_text(str(pid))
                expect(page.locator("#schedules")).to_contain_text("hourly-square")
                expect(page.locator("#tasks")).to_contain_text("_tasks.square")
                # Let the charts get a few samples, then take the docs' picture.
                page.wait_for_function(
                    "() => document.getElementById('status').textContent.startsWith('updated')")
                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                target = os.environ.get("TASKORCH_SCREENSHOT")
                if target:
                    shutil.copyfile(shot, target)
                # Without the token the page says so, and the API refused it (401).
                page.goto(service.url)
                expect(page.locator("#status")).to_contain_text("a token is needed")
            finally:
                browser.close()
        assert [line for line in console if "401" not in line] == [], console
    finally:
        service.close()
