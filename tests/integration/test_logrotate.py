"""Lines mode under Debian's logrotate, the real tool: it rotates a file that a steady writer appends to while the
daemon reads it, with ``create`` (the writer reopens the name) or ``copytruncate`` (the writer never reopens), and
``compress``, ``delaycompress`` and ``dateext`` both times. Every line that logrotate kept is delivered once, each
file's lines in order, and the compressed rotations are never read as new files (the pattern, ``app.log*``,
matches them)."""

from __future__ import annotations

import gzip
import os
import threading
import time
from pathlib import Path

import anyio
import pytest

from tests.integration.test_files import delivered_lines
from tests.support import base_config, running_daemon, wait_for

pytestmark = pytest.mark.anyio

PRINT_DATA = "grep -o '\"data\\(_base64\\)\\?\":\"[^\"]*\"' | cut -d'\"' -f4"
"""Each event's data, or its data_base64 (a line that is not text: what a compressed file read as lines would give)."""




class Writer(threading.Thread):
    """Appends ``L<n>`` lines, one every 2 ms: reopening the file by name for each line (``create``: a logger that
    reopens), or through one handle kept open (``copytruncate``: a program that never reopens)."""

    def __init__(self, path: Path, reopen: bool) -> None:
        super().__init__(daemon=True)
        self.path, self.reopen, self.written, self.done = path, reopen, 0, threading.Event()

    def run(self) -> None:
        handle = None if self.reopen else self.path.open("a")
        try:
            while not self.done.is_set():
                line = f"L{self.written:06d}\n"
                if handle is None:
                    # (without O_CREAT: between logrotate's rename and its create there is no file, and making one
                    # there would make logrotate's create fail; the line waits a moment instead)
                    try:
                        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
                    except FileNotFoundError:
                        time.sleep(0.001)
                        continue
                    try:
                        os.write(fd, line.encode())
                    finally:
                        os.close(fd)
                else:
                    handle.write(line)
                    handle.flush()
                self.written += 1
                time.sleep(0.002)
        finally:
            if handle is not None:
                handle.close()


def kept_lines(folder: Path) -> dict[str, list[str]]:
    """Every file logrotate left (the live one, the rotations, the compressed ones), and its lines."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("app.log"):
            content = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            files[path.name] = content.decode().split()
    return files


@pytest.mark.parametrize("method", ["create", "copytruncate"])
async def test_logrotate_under_a_steady_writer_loses_and_repeats_nothing_it_kept(tmp_path, debian_tools, method):
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    log = logs / "app.log"
    log.touch()
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"""{log} {{
    rotate 10
    {method}
    compress
    delaycompress
    dateext
    dateformat -%Y%m%d-%H%M%S
    missingok
}}
""")
    doc = base_config(tmp_path, executor="process")
    doc["functions"]["f"] = {"command": ["sh", "-c", PRINT_DATA], "timeout": "30s"}
    doc["triggers"]["t"] = {"function": "f", "ordering": "partition", "batch": {"max_events": 200, "max_wait": "50ms"},
                            "source": {"kind": "file", "path": str(logs), "mode": "lines", "patterns": ["app.log*"]}}
    writer = Writer(log, reopen=method == "create")
    async with running_daemon(doc) as daemon:
        writer.start()
        for _ in range(3):
            await wait_for(lambda: len(delivered_lines(doc)) >= writer.written - 50 and writer.written > 300, timeout=30,
                           what="the reader to keep up")
            await anyio.sleep(1.1)  # (dateext names rotations by the second)
            done = await anyio.run_process(["/usr/sbin/logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
                                           check=False)
            assert done.returncode == 0, done.stderr.decode()
        writer.done.set()
        writer.join()
        files = kept_lines(logs)
        kept = [line for lines in files.values() for line in lines]
        await wait_for(lambda: set(kept) <= set(delivered_lines(doc)), timeout=60, what="every line kept to be delivered")
        reading = [tail.rel for tail in daemon.triggers["t"].source.lines.tails.values()]
        assert not [rel for rel in reading if rel.endswith(".gz")], reading  # matched by the pattern, never opened
    names = sorted(files)
    assert sum(name.endswith(".gz") for name in names) == 2 and len(names) == 4, names  # 3 rotations, 2 compressed
    lines = delivered_lines(doc)
    assert len(lines) == len(set(lines)), "a line was delivered twice"
    written = {f"L{n:06d}" for n in range(writer.written)}
    assert set(lines) <= written  # nothing from a compressed file read as text
    if method == "create":
        assert set(lines) == written  # a writer that reopens loses nothing to logrotate
    first_seen = {line: i for i, line in enumerate(lines)}
    for name, content in files.items():  # each file's lines in the order they were written
        order = [first_seen[line] for line in content]
        assert order == sorted(order), f"{name}: lines out of order"
