"""The invalid-config corpus (tests/configs/invalid): for each file, `validate` and `run` exit 2 and print every
error the file's `# expect:` lines name, each with its key path, and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CORPUS = sorted((Path(__file__).parent.parent / "configs" / "invalid").glob("*.toml"))


def expected(file: Path) -> list[str]:
    return [line.removeprefix("# expect: ") for line in file.read_text().splitlines() if line.startswith("# expect: ")]


def test_the_corpus_is_large_enough_and_every_file_says_what_it_expects():
    assert len(CORPUS) >= 40
    assert all(expected(f) for f in CORPUS), [f.name for f in CORPUS if not expected(f)]


def test_every_invalid_config_is_refused_by_validate_and_run_with_exit_2_and_every_error_named_by_its_key_path(
        tmp_path, monkeypatch):
    """Through the CLI's own entry point (click's runner, in this process: 112 runs in a second). ``run`` is
    tried only on what ``validate`` refused: a config taken as valid would start a daemon here."""
    from click.testing import CliRunner

    from dispatcher.cli import main

    for name in [k for k in os.environ if k.startswith(("EVENTSWARM_", "ES_CORPUS_"))]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    failures = []
    for file in CORPUS:
        for command in ("validate", "run"):
            result = CliRunner().invoke(main, [command, "-c", str(file)])
            lines = [line.removeprefix(f"{file}: ") for line in result.stderr.splitlines()]
            if result.exit_code != 2 or not isinstance(result.exception, SystemExit) \
                    or "Traceback" in result.output or sorted(lines) != sorted(expected(file)):
                failures.append(f"{file.name}: {command}: exit {result.exit_code} ({result.exception!r}), printed "
                                f"{lines}, expected {expected(file)}")
                break
    assert not failures, "\n".join(failures)
    assert not list(tmp_path.iterdir()), "an invalid config left a state store behind"


@pytest.mark.parametrize("name", ["several-errors", "listen-public-without-token", "process-read-only", "toml-syntax"])
def test_an_invalid_config_is_one_line_per_error_from_the_real_command_too(tmp_path, name):
    file = CORPUS[0].parent / f"{name}.toml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSWARM_", "ES_CORPUS_"))}
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda command: subprocess.run(
            [sys.executable, "-m", "dispatcher", command, "-c", str(file)], capture_output=True, text=True,
            timeout=60, env=env, cwd=tmp_path), ["validate", "run"]))
    for done in runs:
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert sorted(line.removeprefix(f"{file}: ") for line in done.stderr.splitlines()) == sorted(expected(file))
