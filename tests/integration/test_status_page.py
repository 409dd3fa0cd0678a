"""The status page at /, in a real browser (Debian's chromium, headless, driven by playwright), against a real
daemon with an API token: counts, a failed invocation's stderr on click, a replay from the page, live updates."""

from __future__ import annotations

import json
import urllib.request

from tests.support import BUSYBOX, base_config, free_port, post, store_of, wait_until

TOKEN = "page-token-42"


def test_the_status_page_counts_opens_stderr_replays_a_dead_letter_and_updates_without_a_reload(
        tmp_path, daemon_process, chromium):
    from playwright.sync_api import expect, sync_playwright

    flag = tmp_path / "broken"
    flag.touch()
    doc = base_config(tmp_path, executor="process", port=free_port(), api_token_env="ES_PAGE_TOKEN")
    doc["functions"]["ok"] = {"command": ["sh", "-c", "cat >/dev/null; echo fine"]}
    doc["functions"]["bad"] = {"command": ["sh", "-c", f"cat >/dev/null; if [ -e {flag} ]; then "
                                           "echo broken-stderr-line >&2; exit 3; fi; echo fixed"]}
    for name in ("ok", "bad"):
        doc["triggers"][name] = {"function": name, "source": {"kind": "webhook", "path": f"/hooks/{name}"},
                                 "batch": {"max_events": 1, "max_wait": "10ms"}, "retry": {"max_attempts": 1}}
    daemon = daemon_process(doc, env={"ES_PAGE_TOKEN": TOKEN}).start()
    base = f"http://127.0.0.1:{daemon.port}"
    for n in range(3):
        assert post(f"{base}/hooks/ok", json.dumps({"n": n}).encode())[0] == 202
    assert post(f"{base}/hooks/bad", b'{"n": 9}')[0] == 202
    wait_until(lambda: store_of(doc).dead_letters(), timeout=30, what="the dead letter")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{base}/")
            expect(page.locator("#auth")).to_be_visible()  # /v1 answered 401: the page asks for the token
            page.fill("#token", TOKEN)
            page.click("#token-form button")
            ok, bad = page.locator('tr[data-trigger="ok"]'), page.locator('tr[data-trigger="bad"]')
            expect(ok.locator("td.received")).to_have_text("3")
            expect(bad.locator("td.received")).to_have_text("1")
            expect(bad.locator("td.error")).to_contain_text("exit code 3")
            expect(page.locator("#auth")).to_be_hidden()
            expect(page.locator("#pools")).to_be_hidden()  # no warm function: no pools section
            expect(page.locator("#replicas")).to_be_hidden()  # one daemon alone: no replicas section

            page.evaluate("window.notReloaded = true")
            for n in range(2):
                assert post(f"{base}/hooks/ok", json.dumps({"n": 10 + n}).encode())[0] == 202
            expect(ok.locator("td.received")).to_have_text("5")  # by polling, not by a reload:
            assert page.evaluate("window.notReloaded === true")

            page.locator('#invocations tr[data-status="failed"]').first.click()
            expect(page.locator("#logs")).to_be_visible()
            expect(page.locator("#stderr")).to_have_text("broken-stderr-line\n")

            flag.unlink()
            page.locator("#letters button.replay").first.click()
            expect(page.locator("#letters tbody")).to_contain_text("no dead letters", timeout=30_000)
            expect(page.locator('#invocations tr[data-status="succeeded"] td.trigger', has_text="bad")).to_have_count(1)
            page.screenshot(path=str(tmp_path / "status-page.png"), full_page=True)

            page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing wider than the screen
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
            assert not errors, errors
        finally:
            browser.close()
    assert not store_of(doc).dead_letters() and [r.trigger for r in store_of(doc).invocations(status="succeeded")
                                                   if r.trigger == "bad"] == ["bad"]
    assert daemon.stop() == 0


def test_the_status_page_shows_each_warm_pool(tmp_path, daemon_process, chromium, docker_engine):
    from playwright.sync_api import expect, sync_playwright

    doc = base_config(tmp_path, executor="docker", port=free_port())
    doc["functions"]["echo"] = {"image": BUSYBOX, "command": ["cat"], "warm": {"min_idle": 2, "max": 3}}
    doc["triggers"]["echo"] = {"function": "echo", "source": {"kind": "webhook", "path": "/hooks/echo", "mode": "sync"}}
    daemon = daemon_process(doc).start()
    base = f"http://127.0.0.1:{daemon.port}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page()
            page.goto(f"{base}/")
            row = page.locator('#pool-table tr[data-function="echo"]')
            expect(row.locator("td.idle")).to_have_text("2", timeout=30_000)
            expect(row.locator("td.size")).to_have_text("2 of 3")
            expect(row.locator("td.replaced")).to_have_text("none")
            assert post(f"{base}/hooks/echo", b"{}")[0] == 200
            expect(row.locator("td.starts")).to_have_text("2")
        finally:
            browser.close()
    assert daemon.stop() == 0


def test_the_status_page_shows_every_replica_and_what_each_holds(tmp_path, daemon_process, chromium,
                                                                  postgres_database):
    from playwright.sync_api import expect, sync_playwright

    drop = tmp_path / "drop"
    drop.mkdir()
    docs = {}
    for name in ("a", "b"):
        doc = base_config(tmp_path, executor="process", port=free_port())
        doc["daemon"].update({"state": postgres_database, "replica": name})
        doc["functions"]["f"] = {"command": ["sh", "-c", "cat > /dev/null"]}
        doc["triggers"]["files"] = {"function": "f", "source": {"kind": "file", "path": str(drop)}}
        docs[name] = doc
    first = daemon_process(docs["a"], name="a").start()
    wait_until(lambda: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{first.port}/v1/status").read())[
        "triggers"][0]["state"] == "running", timeout=30, what="a to read the folder")
    second = daemon_process(docs["b"], name="b").start()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{second.port}/")
            a, b = page.locator('#replica-table tr[data-replica="a"]'), page.locator('#replica-table tr[data-replica="b"]')
            expect(page.locator("#replicas")).to_be_visible()
            expect(a.locator("td.holds")).to_have_text("trigger/files (token 1)")
            expect(a.locator("td.state")).to_have_text("live")
            expect(b.locator("td.name")).to_have_text("b (this one)")
            expect(b.locator("td.holds")).to_have_text("-")
            expect(page.locator('tr[data-trigger="files"] td.state')).to_have_text("standby")
        finally:
            browser.close()
    assert second.stop() == 0 and first.stop() == 0


def test_the_status_page_shows_each_schedules_next_and_last_tick(tmp_path, daemon_process, chromium):
    from playwright.sync_api import expect, sync_playwright

    doc = base_config(tmp_path, executor="process", port=free_port())
    doc["functions"]["f"] = {"command": ["cat"]}
    doc["triggers"]["beat"] = {"function": "f", "source": {"kind": "schedule", "every": "1s"}}
    doc["triggers"]["nightly"] = {"function": "f", "source": {"kind": "schedule", "cron": "30 2 * * *",
                                                              "timezone": "Europe/Berlin"}}
    daemon = daemon_process(doc).start()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{daemon.port}/")
            beat, nightly = (page.locator(f'#schedule-table tr[data-trigger="{name}"]') for name in ("beat", "nightly"))
            expect(beat.locator("td.last-tick")).to_contain_text(" ago)", timeout=30_000)
            expect(beat.locator("td.next-tick")).to_contain_text("(in ")
            expect(nightly.locator("td.next-tick")).to_contain_text(":30:00.000000Z (in ")
            expect(nightly.locator("td.last-tick")).to_have_text("none since the start")
        finally:
            browser.close()
    assert daemon.stop() == 0
