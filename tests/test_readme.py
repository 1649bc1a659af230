"""The README's examples as written: the quick start runs, and every ``ocnode`` command line it
shows is accepted by the command's parser (the tiny versions of each task's run are in
test_cli_tasks.py)."""

from __future__ import annotations

import re
import runpy
import shlex
from pathlib import Path

import pytest

from ocnode.training.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_quick_start_runs_and_prints_a_falling_loss(
    one_thread: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (quick_start,) = [b for b in _blocks("python") if "ocnode.SNOpt" in b]
    script = tmp_path / "quick_start.py"
    script.write_text(quick_start)
    runpy.run_path(str(script))
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", capsys.readouterr().out)]
    assert len(losses) == 5 and losses[-1] < losses[0]


def test_every_ocnode_command_in_the_readme_parses() -> None:
    lines = [line.split("#")[0].strip() for block in _blocks("bash")
             for line in block.splitlines()]
    commands = [line for line in lines if line.startswith("ocnode ")]
    assert len(commands) >= 10
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv[0] == "solvers" or "--help" in argv:  # the study parses its own flags
            continue
        parser.parse_args(argv)
