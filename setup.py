"""The build carries the warm functions' runner: ``runner/eventswarm-runner.c``, compiled into a static binary
beside the executors when the package is built (``pip install .``, a wheel). Everything else is in
pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCE = Path(__file__).parent / "runner" / "eventswarm-runner.c"
BUILT = Path("dispatcher") / "executors" / "bin" / "eventswarm-runner"


def compile_runner(out: Path) -> str | None:
    """Build the runner at ``out`` with musl-gcc (preferred: no libc in the image it is injected into), else the
    C compiler with a static libc; None when done, else why not."""
    tried = []
    for compiler in ("musl-gcc", "cc", "gcc"):
        if shutil.which(compiler) is None:
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([compiler, "-static", "-Os", "-s", "-Wall", "-o", str(out), str(SOURCE)],
                              capture_output=True, text=True)
        if done.returncode == 0:
            return None
        tried.append(f"{compiler}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return "; ".join(tried) or "no C compiler (musl-gcc, cc or gcc) on PATH"


class BuildWithRunner(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / BUILT
        if target.exists():
            return
        if BUILT.exists() and SOURCE.exists() and BUILT.stat().st_mtime >= SOURCE.stat().st_mtime:  # (`make install`)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(BUILT, target)
            return
        if not SOURCE.exists():
            return
        problem = compile_runner(target)
        if problem is not None:
            print(f"eventswarm: the warm functions' runner was not built ({problem}): warm functions will not "
                  "start; install Debian's musl-tools (or a C compiler with a static libc) and install again",
                  file=sys.stderr)


setup(cmdclass={"build_py": BuildWithRunner})
