"""The file source against the stub context, on real folders: what is picked up, how it travels, where it ends."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from connectors.file import FileSource, FileSourceConfig
from dispatcher.testing import StubContext
from tests.support import wait_for

pytestmark = pytest.mark.anyio


def source(folder: Path, **options: Any) -> FileSource:
    return FileSource(FileSourceConfig(kind="file", path=str(folder), stable_for=0.05, **options))


def events(ctx: StubContext) -> dict[str, dict[str, Any]]:
    """The emitted events by file name, as the function would read them."""
    found = {}
    for emitted in ctx._runs:
        for i in range(len(emitted.run)):
            doc = json.loads(emitted.run.encoded[i])
            found[doc["filename"]] = doc
    return found


async def test_content_travels_as_json_text_or_base64_and_hidden_or_partial_files_are_ignored(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1}')
    (tmp_path / "b.txt").write_text("héllo")
    (tmp_path / "c.bin").write_bytes(b"\xff\x00\x01")
    (tmp_path / "d.json").write_text("{not json")
    for ignored in (".hidden", "e.tmp", "f.part", "g.json.error.json"):
        (tmp_path / ignored).write_text("{}")
    ctx = StubContext()

    async with ctx.running(source(tmp_path)):
        await ctx.wait_emitted(4)
    found = events(ctx)
    assert set(found) == {"a.json", "b.txt", "c.bin", "d.json"}
    assert found["a.json"]["data"] == {"x": 1}
    assert found["b.txt"]["data"] == "héllo" and found["b.txt"]["datacontenttype"] == "text/plain"
    assert base64.b64decode(found["c.bin"]["data_base64"]) == b"\xff\x00\x01"
    assert "not valid JSON" in found["d.json"]["dataerror"] and "data_base64" in found["d.json"]
    assert found["a.json"]["sha256"] == hashlib.sha256(b'{"x": 1}').hexdigest() and found["a.json"]["filesize"] == 8
    assert all(n in os.listdir(tmp_path) for n in (".hidden", "e.tmp", "f.part", "g.json.error.json"))


async def test_files_left_claimed_by_a_crash_are_taken_up_first(tmp_path):
    claimed = tmp_path / ".processing" / "t" / "sub"
    claimed.mkdir(parents=True)
    (claimed / "left.json").write_text('{"left": true}')
    ctx = StubContext()

    async with ctx.running(source(tmp_path)):
        await ctx.wait_emitted(1)
        assert ctx.emitted == [next(iter(events(ctx).values()))["id"]]
        await ctx.settle()
    assert json.loads((tmp_path / "done" / "sub" / "left.json").read_text()) == {"left": True}


async def test_the_same_file_dropped_again_is_not_run_again_but_a_changed_one_is(tmp_path):
    ctx = StubContext()

    async with ctx.running(source(tmp_path)):
        (tmp_path / "x.json").write_text('{"v": 1}')
        await ctx.wait_emitted(1)
        await ctx.settle()
        (tmp_path / "x.json").write_text('{"v": 1}')  # the same again
        await wait_for(lambda: (tmp_path / "done" / "x.json.1").exists(), timeout=10, what="the copy in done/")
        assert len(ctx.emitted) == 1
        (tmp_path / "x.json").write_text('{"v": 2}')  # changed: a new file
        await ctx.wait_emitted(2)


async def test_keep_puts_the_file_back_and_a_rescan_does_not_claim_it_again(tmp_path):
    ctx = StubContext()
    src = source(tmp_path, on_success="keep", rescan_interval=0.05)

    async with ctx.running(src):
        (tmp_path / "k.json").write_text("{}")
        await ctx.wait_emitted(1)
        await ctx.settle()
        assert (tmp_path / "k.json").exists()
        scans = src.scans
        await wait_for(lambda: src.scans >= scans + 3, timeout=10, what="three more scans")
        assert len(ctx.emitted) == 1 and (tmp_path / "k.json").exists()


async def test_a_dead_lettered_file_moves_to_failed_with_its_reason(tmp_path):
    ctx = StubContext()

    async with ctx.running(source(tmp_path, on_failure="move:/" + str(tmp_path / "rejects").lstrip("/"))):
        (tmp_path / "bad.json").write_text("{}")
        await ctx.wait_emitted(1)
        await ctx.settle(status="dead-lettered")
    reason = json.loads((tmp_path / "rejects" / "bad.json.error.json").read_text())
    assert reason["status"] == "dead-lettered" and reason["file"] == "bad.json" and reason["trigger"] == "t"
    assert (tmp_path / "rejects" / "bad.json").read_text() == "{}"


async def test_recursive_scans_subfolders_but_not_its_own_folders_and_patterns_may_hold_a_path(tmp_path):
    (tmp_path / "in" / "deep").mkdir(parents=True)
    (tmp_path / "in" / "deep" / "a.csv").write_text("1")
    (tmp_path / "in" / "b.csv").write_text("2")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "c.csv").write_text("3")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "old.csv").write_text("0")
    ctx = StubContext()
    src = source(tmp_path, recursive=True, patterns=["in/*.csv", "in/*/*.csv"], rescan_interval=0.05)

    async with ctx.running(src):
        await ctx.wait_emitted(2)
        await wait_for(lambda: src.scans >= 3, timeout=10, what="three scans")
        assert set(events(ctx)) == {"in/deep/a.csv", "in/b.csv"}


async def test_a_folder_that_does_not_exist_is_a_source_error_naming_it(tmp_path):
    from dispatcher.api import SourceError

    with pytest.raises(SourceError, match="does not exist"):
        await source(tmp_path / "nowhere").run(StubContext())


async def test_memory_of_done_files_is_forgotten_after_remember_done(tmp_path):
    ctx = StubContext()
    await ctx.checkpoints.put({"done/old.json": json.dumps({"sha256": "x", "result": "done"})})
    ctx.checkpoints.saved["done/old.json"] -= 3600

    async with ctx.running(source(tmp_path, remember_done=60)):
        pass
    assert "done/old.json" not in ctx.checkpoints.values


async def test_memory_of_done_files_is_forgotten_while_the_source_runs_too(tmp_path, monkeypatch):
    """Not only at start: a daemon that runs for months would remember months of files."""
    monkeypatch.setattr("connectors.file.FORGET_EVERY", 0.0)
    ctx = StubContext()
    async with ctx.running(source(tmp_path, remember_done=60)):
        await ctx.checkpoints.put({"done/old.json": json.dumps({"sha256": "x", "result": "done"})})
        ctx.checkpoints.saved["done/old.json"] -= 3600
        (tmp_path / "new.json").write_text("{}")  # (a scan, after which the source forgets)
        await wait_for(lambda: "done/old.json" not in ctx.checkpoints.values, timeout=10,
                       what="the old file to be forgotten while running")


async def test_a_file_that_grows_while_it_is_read_is_not_half_delivered(tmp_path, monkeypatch):
    """The writer appends while the source reads (here: right after the source's first read, once): the file goes
    back to the folder and is read again once complete, so its event has the whole content."""
    import connectors.file as file_module

    growing = tmp_path / "growing.txt"
    growing.write_text("first part")
    appended = []

    class Reader:
        def __init__(self, f: Any) -> None:
            self.f = f

        def read(self, size: int = -1) -> bytes:
            data = self.f.read(size)
            if not appended:
                appended.append(True)
                with open(growing if growing.exists() else next(tmp_path.rglob("growing.txt")), "a") as writer:
                    writer.write(" and more")
            return data

        def __enter__(self) -> Reader:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.close()

    class Os:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        @staticmethod
        def fdopen(fd: int, mode: str) -> Reader:
            return Reader(os.fdopen(fd, mode))

    monkeypatch.setattr(file_module, "os", Os())
    ctx = StubContext()
    async with ctx.running(source(tmp_path)):
        await ctx.wait_emitted(1)
    assert appended and [doc["data"] for doc in events(ctx).values()] == ["first part and more"]
    assert len(ctx._runs) == 1
