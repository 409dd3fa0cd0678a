"""Drop folders are written by others (docs/configuration.md, the file source): through a real daemon, what lands
there is never a way to the host's files, and no name or special file stalls the folder.

The function is `cat` under the process executor: every invocation's stdout is its whole input document, so what a
batch was given is what its record shows.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.support import base_config, running_daemon, store_of, wait_for

pytestmark = pytest.mark.anyio

SECRET = "TOP-SECRET-HOST-FILE"


def config(tmp_path: Path, **source: Any) -> dict[str, Any]:
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    doc = base_config(tmp_path, executor="process")
    doc["functions"]["f"] = {"command": ["cat"], "timeout": "30s"}
    doc["triggers"]["t"] = {"function": "f", "ordering": "none",
                            "source": {"kind": "file", "path": str(drop), **source,
                                       **({} if source.get("mode") == "lines" else {"stable_for": "200ms"})},
                            "batch": {"max_events": 50, "max_wait": "50ms"},
                            "retry": {"max_attempts": 1}}
    return doc


def delivered(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every event every invocation was given (from the stdout `cat` left in its record)."""
    store = store_of(doc)
    events = []
    for record in store.invocations(limit=10_000):
        stdout = store.logs(record.id)[0]
        if stdout:
            events += json.loads(stdout)["events"]
    return events


def everything_recorded(doc: dict[str, Any]) -> bytes:
    store = store_of(doc)
    return b"".join(b"".join(store.logs(r.id)) for r in store.invocations(limit=10_000))


def entries(folder: Path) -> set[bytes]:
    return set(os.listdir(os.fsencode(folder))) if folder.exists() else set()


def secret_file(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    return secret


async def drop_and_wait(drop: Path, doc: dict[str, Any], name: str = "after.txt") -> None:
    """Drop a plain file and wait until it ran: what was dropped before it has been looked at by then."""
    (drop / name).write_text(f"plain {name}")
    await wait_for(lambda: (drop / "done" / name).exists(), timeout=30, what=f"{name} in done/")


async def test_a_symlink_to_a_file_outside_the_folder_is_not_delivered(tmp_path, caplog):
    doc = config(tmp_path)
    drop = tmp_path / "drop"
    secret = secret_file(tmp_path)
    (drop / "link.txt").symlink_to(secret)
    async with running_daemon(doc):
        await drop_and_wait(drop, doc)
        await wait_for(lambda: (drop / "failed" / "link.txt.error.json").exists(), what="the link's reason")
    assert SECRET.encode() not in everything_recorded(doc)
    assert [e["filename"] for e in delivered(doc)] == ["after.txt"]
    assert (drop / "failed" / "link.txt").is_symlink() and secret.read_text() == SECRET  # the link moved, not its target
    why = json.loads((drop / "failed" / "link.txt.error.json").read_text())
    assert why["status"] == "refused" and "symbolic link" in why["error"]
    assert sum("link.txt is not read" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1


async def test_with_follow_symlinks_a_link_inside_the_folder_is_read_and_one_outside_still_is_not(tmp_path):
    doc = config(tmp_path, follow_symlinks=True, patterns=["*.txt"])
    drop = tmp_path / "drop"
    secret = secret_file(tmp_path)
    (drop / "data.dat").write_text("INSIDE-CONTENT")  # (not a pattern: read only through the link)
    (drop / "inside.txt").symlink_to("data.dat")  # (relative: resolved from the folder it was dropped in)
    (drop / "outside.txt").symlink_to(secret)
    (drop / "sneaky.txt").symlink_to(f"../outside/{secret.name}")
    async with running_daemon(doc):
        await drop_and_wait(drop, doc)
        await wait_for(lambda: (drop / "done" / "inside.txt").is_symlink(), what="the inside link in done/")
        await wait_for(lambda: (drop / "failed" / "sneaky.txt.error.json").exists(), what="the sneaky link refused")
    events = {e["filename"]: e for e in delivered(doc)}
    assert events["inside.txt"]["data"] == "INSIDE-CONTENT"
    assert events["inside.txt"]["filepath"] == str((drop / "data.dat").resolve())
    assert set(events) == {"inside.txt", "after.txt"}
    assert SECRET.encode() not in everything_recorded(doc)
    for name in ("outside.txt", "sneaky.txt"):
        assert "outside the folder" in json.loads((drop / "failed" / f"{name}.error.json").read_text())["error"]
    assert (drop / "data.dat").read_text() == "INSIDE-CONTENT"  # the target stays where it is


async def test_with_allow_outside_a_link_outside_the_folder_is_read(tmp_path):
    doc = config(tmp_path, follow_symlinks=True, allow_outside=True)
    drop = tmp_path / "drop"
    (drop / "outside.txt").symlink_to(secret_file(tmp_path))
    async with running_daemon(doc):
        await drop_and_wait(drop, doc)
        await wait_for(lambda: (drop / "done" / "outside.txt").is_symlink(), what="the link in done/")
    assert {e["filename"]: e["data"] for e in delivered(doc)}["outside.txt"] == SECRET


async def test_a_fifo_and_a_link_to_dev_zero_are_said_once_and_do_not_stall_the_folder(tmp_path, caplog):
    doc = config(tmp_path, follow_symlinks=True, allow_outside=True)
    drop = tmp_path / "drop"
    async with running_daemon(doc):
        os.mkfifo(drop / "pipe.txt")
        (drop / "zero.txt").symlink_to("/dev/zero")
        await wait_for(lambda: (drop / "failed" / "pipe.txt.error.json").exists()
                       and (drop / "failed" / "zero.txt.error.json").exists(), what="both refused")
        # a file dropped after them is claimed within stable_for (0.2 s) and a second
        (drop / "after.txt").write_text("plain")
        await wait_for(lambda: not (drop / "after.txt").exists(), timeout=1.2, what="after.txt claimed")
        await wait_for(lambda: (drop / "done" / "after.txt").exists(), what="after.txt done")
    assert stat.S_ISFIFO(os.lstat(drop / "failed" / "pipe.txt").st_mode)
    assert "named pipe" in json.loads((drop / "failed" / "pipe.txt.error.json").read_text())["error"]
    assert "character device" in json.loads((drop / "failed" / "zero.txt.error.json").read_text())["error"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("pipe.txt is not read" in w for w in warnings) == 1 and sum("zero.txt is not read" in w for w in warnings) == 1
    assert [e["filename"] for e in delivered(doc)] == ["after.txt"]


async def test_with_on_failure_keep_what_is_not_read_stays_with_one_warning(tmp_path, caplog):
    doc = config(tmp_path, on_failure="keep", rescan_interval="200ms")
    drop = tmp_path / "drop"
    os.mkfifo(drop / "pipe.txt")
    async with running_daemon(doc):
        await drop_and_wait(drop, doc)  # (two files after it: several scans have seen it by then)
        await drop_and_wait(drop, doc, "second.txt")
    assert stat.S_ISFIFO(os.lstat(drop / "pipe.txt").st_mode)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("pipe.txt is not read" in w for w in warnings) == 1, warnings


async def test_a_file_over_max_file_size_goes_to_failed_with_its_reason(tmp_path):
    doc = config(tmp_path, max_file_size="1KiB")
    drop = tmp_path / "drop"
    (drop / "big.bin").write_bytes(b"x" * 2048)
    long = "B" * 251 + ".bin"  # (255 bytes: its reason file's name is cut, with a hash of the whole)
    (drop / long).write_bytes(b"y" * 2048)
    async with running_daemon(doc):
        await drop_and_wait(drop, doc)
        await wait_for(lambda: len(entries(drop / "failed")) == 4, what="both refused, with their reasons")
    why = json.loads((drop / "failed" / "big.bin.error.json").read_text())
    assert why["status"] == "refused" and "over max_file_size (1024 bytes)" in why["error"]
    assert (drop / "failed" / "big.bin").stat().st_size == 2048 and (drop / "failed" / long).stat().st_size == 2048
    (reason_of_long,) = [p for p in (drop / "failed").glob("BBB*.error.json")]
    assert len(reason_of_long.name.encode()) == 255 and json.loads(reason_of_long.read_text())["file"] == long
    assert [e["filename"] for e in delivered(doc)] == ["after.txt"]


async def test_names_with_a_newline_invalid_utf8_and_255_bytes_are_delivered_and_moved(tmp_path):
    doc = config(tmp_path)
    drop = tmp_path / "drop"
    names = [b"line\nbreak.txt", b"bad-\xff\xfe.txt", b"-dash.txt", b"L" * 251 + b".txt"]
    for name in names:
        (drop / os.fsdecode(name)).write_bytes(b"content of " + name)
    async with running_daemon(doc):
        await wait_for(lambda: entries(drop / "done") == set(names), timeout=30, what="every name in done/")
        await drop_and_wait(drop, doc)
    events = delivered(doc)
    by_bytes = {base64.b64decode(e["filenamebase64"]) if "filenamebase64" in e else e["filename"].encode(): e
                for e in events}
    assert set(by_bytes) == {*names, b"after.txt"}
    for name in names:
        event = by_bytes[name]
        content = base64.b64decode(event["data_base64"]) if "data_base64" in event else event["data"].encode()
        assert content == b"content of " + name
    bad = by_bytes[b"bad-\xff\xfe.txt"]
    assert bad["filename"] == "bad-\\xff\\xfe.txt" and bad["subject"] == "bad-\\xff\\xfe.txt"
    assert entries(drop) == {b"done", b".processing"}


async def test_reason_files_and_moved_files_keep_the_owner_and_mode_of_the_dropped_file(tmp_path):
    assert os.geteuid() == 0, "this test runs as root (as CI does): it gives the dropped file to another user"
    doc = config(tmp_path, max_file_size="10B")
    drop = tmp_path / "drop"
    dropped = drop / "private.txt"
    dropped.write_text("private and over ten bytes")
    os.chown(dropped, 4321, 4321)
    os.chmod(dropped, 0o600)
    async with running_daemon(doc):
        await wait_for(lambda: (drop / "failed" / "private.txt.error.json").exists(), what="its reason file")
    for path in (drop / "failed" / "private.txt", drop / "failed" / "private.txt.error.json"):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 4321, 0o600), path


async def test_lines_mode_holds_the_same_symlink_rules(tmp_path, caplog):
    doc = config(tmp_path, mode="lines", patterns=["*.log"])
    drop = tmp_path / "drop"
    secret = secret_file(tmp_path)
    (drop / "outside.log").symlink_to(secret)
    (drop / "plain.log").write_text("a plain line\n")
    async with running_daemon(doc):
        await wait_for(lambda: any(e["data"] == "a plain line" for e in delivered(doc)), what="the plain line")
    assert SECRET.encode() not in everything_recorded(doc)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("outside.log is not read" in w for w in warnings) == 1, warnings
    assert (drop / "outside.log").is_symlink()  # lines mode moves nothing


async def test_lines_mode_with_follow_symlinks_tails_a_link_inside_and_never_one_outside(tmp_path):
    doc = config(tmp_path, mode="lines", patterns=["*.log"], follow_symlinks=True)
    drop = tmp_path / "drop"
    secret = secret_file(tmp_path)
    (drop / "real.txt").write_text("through the link\n")
    (drop / "inside.log").symlink_to("real.txt")
    (drop / "outside.log").symlink_to(secret)
    async with running_daemon(doc):
        await wait_for(lambda: any(e["data"] == "through the link" for e in delivered(doc)), what="the linked line")
        with (drop / "real.txt").open("a") as f:
            f.write("and a second line\n")
        await wait_for(lambda: any(e["data"] == "and a second line" for e in delivered(doc)), what="the line added")
    assert SECRET.encode() not in everything_recorded(doc)
