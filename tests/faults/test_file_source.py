"""The file source under faults: a folder it cannot write (read-only file system), a pattern that matches nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

from tests.faults.conftest import tmpfs
from tests.support import base_config, running_daemon, wait_for

pytestmark = pytest.mark.anyio


def config(tmp_path: Path, folder: Path, **source: object) -> dict:
    doc = base_config(tmp_path, executor="process")
    doc["functions"]["f"] = {"command": ["sh", "-c", "cat >/dev/null"], "timeout": "30s"}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "file", "path": str(folder), "patterns": ["*.json"],
                                                        "stable_for": "100ms", **source}}
    doc["triggers"]["hook"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/h"}}
    return doc


async def test_a_read_only_folder_is_the_sources_error_and_its_files_are_taken_once_it_is_writable(tmp_path):
    with tmpfs(tmp_path / "drop", "size=4m") as drop:
        (drop / "waiting.json").write_text('{"n": 1}')
        await anyio.run_process(["mount", "-o", "remount,ro", str(drop)])
        async with running_daemon(config(tmp_path, drop), ready=False) as daemon:
            trigger = daemon.triggers["t"]
            await wait_for(lambda: trigger.source_error, timeout=30, what="the source's error")
            assert f"cannot write in {drop}" in trigger.status()["last_error"]
            assert (await daemon._ready())["sources"]["t"] is False
            await wait_for(lambda: daemon.triggers["hook"].ready, timeout=30, what="the other trigger")
            assert (drop / "waiting.json").exists()
            await anyio.run_process(["mount", "-o", "remount,rw", str(drop)])
            await wait_for(lambda: (drop / "done" / "waiting.json").exists(), timeout=60,
                           what="the file done once the folder is writable")


async def test_a_pattern_that_matches_nothing_is_said_once(tmp_path, caplog):
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "report.csv").write_text("a,b\n")
    with caplog.at_level(logging.WARNING, logger="eventswarm.file"):
        async with running_daemon(config(tmp_path, drop), ready=False):
            await wait_for(lambda: "matches patterns" in caplog.text, timeout=30, what="the warning")
    assert caplog.text.count("matches patterns") == 1
    assert f"no file in {drop} matches patterns ['*.json'] (1 other files there)" in caplog.text
    assert (drop / "report.csv").exists()
