"""A package built from the tree is whole: the wheel carries the warm functions' runner, compiled while it is
built (a fresh clone has no binary), and the build prints no deprecation warnings. Built offline, with the build
backend the dev dependencies install (``--no-build-isolation``)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile

from tests.support import ROOT


def test_a_wheel_built_from_a_fresh_tree_carries_a_static_runner(tmp_path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    tree = tmp_path / "tree"
    with tarfile.open(tmp_path / "tree.tar", "w") as archive:
        for name in files:
            if (ROOT / name).exists():
                archive.add(ROOT / name, arcname=name)
    with tarfile.open(tmp_path / "tree.tar") as archive:
        archive.extractall(tree, filter="tar")
    assert not (tree / "dispatcher" / "executors" / "bin").exists()  # (as in a fresh clone)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(tree)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "deprecat" not in (built.stdout + built.stderr).lower(), built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("eventswarm-*.whl")
    with zipfile.ZipFile(wheel) as package:
        info = package.getinfo("dispatcher/executors/bin/eventswarm-runner")
        runner = package.read(info)
    assert info.external_attr >> 16 & 0o111, "the runner is not executable"
    assert runner[:4] == b"\x7fELF"
    assert b"ld-linux" not in runner and b"ld-musl" not in runner, "the runner is not static: it needs a loader"
