"""The file source in lines mode against the stub context, on real files: lines, limits, rotation, truncation."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from connectors.file import FileSource, FileSourceConfig
from dispatcher.testing import StubContext
from tests.support import wait_for

pytestmark = pytest.mark.anyio


def source(folder: Path, **options: Any) -> FileSource:
    return FileSource(FileSourceConfig(kind="file", path=str(folder), mode="lines", patterns=["*.log"], **options))


def emitted(ctx: StubContext) -> list[dict[str, Any]]:
    """Every event emitted and not settled, as the function would read it, in order."""
    return [json.loads(e.run.encoded[i]) for e in ctx._runs for i in range(len(e.run))]


def texts(ctx: StubContext) -> list[str]:
    return [e.get("data") or base64.b64decode(e["data_base64"]).decode("latin-1") for e in emitted(ctx)]


async def test_complete_lines_are_events_and_a_line_without_its_newline_waits(tmp_path):
    log = tmp_path / "app.log"
    log.write_bytes(b"one\ntwo\r\nthr")
    ctx = StubContext()

    async with ctx.running(source(tmp_path)):
        await ctx.wait_emitted(2)
        assert texts(ctx) == ["one", "two"]
        with log.open("ab") as f:
            f.write(b"ee\n")
        await ctx.wait_emitted(3)
        assert texts(ctx) == ["one", "two", "three"]
        events = emitted(ctx)
        assert [e["fileoffset"] for e in events] == [0, 4, 9]
        assert events[0]["filename"] == "app.log" and events[0]["type"] == "eventswarm.file.line"


async def test_a_long_line_is_cut_and_says_so_and_bytes_that_are_not_utf8_travel_as_base64(tmp_path):
    (tmp_path / "app.log").write_bytes(b"x" * 5000 + b"\n" + b"\xff\xfe\n" + b"short\n")
    ctx = StubContext()

    async with ctx.running(source(tmp_path, max_line=100)):
        await ctx.wait_emitted(3)
    long, binary, short = emitted(ctx)
    assert long["data"] == "x" * 100 and long["linelength"] == 5000
    assert base64.b64decode(binary["data_base64"]) == b"\xff\xfe" and "dataerror" in binary
    assert short["data"] == "short" and short["fileoffset"] == 5004


async def test_the_saved_offset_never_passes_an_unsettled_line_and_a_restart_resumes_there(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("".join(f"line {n}\n" for n in range(10)))
    ctx = StubContext()
    src = source(tmp_path)
    key = f"file/{log.stat().st_dev}:{log.stat().st_ino}"

    async with ctx.running(src):
        await ctx.wait_emitted(10)
        ids = list(ctx.unsettled())
        await ctx.settle(ids[:3] + ids[5:])  # lines 3 and 4 are still in flight
        await src.lines.committer.save()
        assert json.loads(ctx.checkpoints.values[key])["offset"] == 3 * len("line 0\n")
    ctx.forget()

    async with ctx.running(source(tmp_path)):
        await ctx.wait_emitted(17)
    assert texts(ctx) == [f"line {n}" for n in range(3, 10)]  # from the saved offset: 3 and 4, and what followed


async def test_rename_rotation_reads_the_old_file_to_its_end_and_the_new_one_from_its_start(tmp_path):
    log = tmp_path / "app.log"
    ctx = StubContext()

    async with ctx.running(source(tmp_path, rescan_interval=0.1)):
        with log.open("a") as old:
            old.write("a1\na2\n")
            old.flush()
            await ctx.wait_emitted(2)
            log.rename(tmp_path / "app.log.1")  # not a watched name any more
            with log.open("a") as new:
                new.write("b1\n")
                new.flush()
                old.write("a3\n")  # the writer has not reopened yet
                old.flush()
                await wait_for(lambda: len(ctx.emitted) >= 4, timeout=20, what="a3 and b1")
        assert sorted(texts(ctx)) == ["a1", "a2", "a3", "b1"]
        assert [t for t in texts(ctx) if t.startswith("a")] == ["a1", "a2", "a3"]


async def test_copytruncate_restarts_at_zero_and_reads_the_rest_of_the_copy(tmp_path):
    log = tmp_path / "app.log"
    first = [f"first {n:04d} " + "x" * 40 for n in range(20)]  # over the fingerprint's 256 bytes
    ctx = StubContext()

    async with ctx.running(source(tmp_path, rescan_interval=0.1)):
        log.write_text("".join(line + "\n" for line in first[:10]))
        await ctx.wait_emitted(10)
        with log.open("a") as f:  # lines the source may not have read before the copy
            f.write("".join(line + "\n" for line in first[10:]))
        shutil.copy(log, tmp_path / "app.log.1")
        os.truncate(log, 0)
        with log.open("a") as f:
            f.write("second 0\nsecond 1\n")
        await wait_for(lambda: len(ctx.emitted) >= 22, timeout=20, what="every line")
    got = texts(ctx)
    assert [t for t in got if t.startswith("first")] == first
    assert [t for t in got if t.startswith("second")] == ["second 0", "second 1"]
    assert len(got) == 22
