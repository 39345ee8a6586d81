"""The dashboard's task records in a real headless Chromium against a real ``taskorch serve
--http`` (issue 25): a running task's progress bar, Cancel on a queued task and Retry on a
failed one through the page's buttons (confirmed, the token asked for once), the states
changing in the table; no error in the browser's console. Saves ``dashboard-tasks.png`` (and
copies it to ``TASKORCH_SCREENSHOT_DIR``, e.g. ``docs/``, when that is set)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import _tasks as T
import pytest
from test_dashboard import CHROMIUM, CHROMIUM_ARGS
from test_http import http_url
from test_service import Server, short_dir, start_server  # noqa: F401 (fixtures)

from taskorch import Policy

R = T.scaled(30)  # deadline for any one result: only catches deadlocks

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is missing (apt-get install chromium)")


def test_dashboard_cancels_a_queued_task_and_retries_a_failed_one(
        start_server: Callable[..., Server], short_dir: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setenv("XDG_CONFIG_HOME", str(short_dir / "conf"))
    server = start_server("--http", "127.0.0.1:0", "--workers", "1", tcp=True)
    token = (short_dir / "conf" / "taskorch" / "http-token").read_text().strip()
    url = http_url(server)
    gate = T.Gate(short_dir, "report")
    counter = short_dir / "counter"
    with server.connect() as client:
        failed = client.with_policy(Policy(retries=0)).run(T.fail_until, str(counter), 2)
        with pytest.raises(ConnectionError):
            failed.result(R)
        running = client.run(T.report_then_block, str(gate.started), str(gate.release_fifo))
        gate.wait_started()
        queued = [client.run(T.add, i, 100) for i in range(3)]
        ids = [client.accepted(f, R) for f in queued]
        T.wait_until(running.progress, what="the running task's progress")

        console: list[str] = []
        dialogs: list[tuple[str, str]] = []

        def answer(dialog: Any) -> None:
            dialogs.append((dialog.type, dialog.message))
            dialog.accept(token if dialog.type == "prompt" else None)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1400})
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}")
                        if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
                page.on("dialog", answer)
                page.goto(url)  # on loopback, GETs need no token; actions ask for it
                rows = page.locator("#records tbody tr")
                expect(rows).to_have_count(5, timeout=R * 1000)
                live = page.locator(f'#records tr[data-id="{running.task_id}"]')
                expect(live.locator("progress")).to_have_count(1)
                expect(live).to_contain_text("30%")
                expect(live.locator(".state")).to_have_text("running")

                victim = page.locator(f'#records tr[data-id="{ids[1]}"]')
                expect(victim.locator(".state")).to_have_text("queued")
                victim.click()
                expect(page.locator("#detail")).to_contain_text("1, 100")  # its arguments
                page.locator("#cancel").click()
                expect(victim.locator(".state")).to_have_text("cancelled")
                expect(page.locator("#action-status")).to_have_text(
                    f"task {ids[1]} cancelled")

                page.locator(f'#records tr[data-id="{failed.task_id}"]').click()
                expect(page.locator("#detail pre")).to_contain_text("ConnectionError")
                page.locator("#retry").click()
                expect(page.locator("#action-status")).to_contain_text(
                    f"task {failed.task_id} retried as task ")
                new_id = int(page.locator("#action-status").text_content().split()[-1])
                expect(page.locator(f'#records tr[data-id="{new_id}"]')).to_have_count(1)

                page.select_option("#state-filter", "cancelled")
                expect(rows).to_have_count(1)
                page.select_option("#state-filter", "")
                expect(rows).to_have_count(6)
                page.locator(f'#records tr[data-id="{running.task_id}"]').click()
                expect(page.locator("#detail")).to_contain_text("3 of 10: three")
                shot = tmp_path / "dashboard-tasks.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                target = os.environ.get("TASKORCH_SCREENSHOT_DIR")
                if target:
                    shutil.copyfile(shot, Path(target) / shot.name)
            finally:
                browser.close()
        prompts = [message for kind, message in dialogs if kind == "prompt"]
        assert len(prompts) == 1, dialogs  # the token, asked for once
        assert [kind for kind, _ in dialogs].count("confirm") == 2
        gate.release()
        assert running.result(R) == "go"
        assert queued[1].cancelled() and queued[0].result(R) == (100, "")
        assert client.result(new_id, R) == 2
    assert console == [], console
