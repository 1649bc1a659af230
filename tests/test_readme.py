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


def test_docs_and_code_never_cite_the_team_documents() -> None:
    root = Path(__file__).resolve().parents[1]
    files = [p for d in ("ocnode", "solvers", "experiments", "docs", "tests")
             for p in (root / d).rglob("*") if p.suffix in (".py", ".md", ".json")]
    files += [root / "README.md", root / "BENCHMARKS.md"]
    team = ("ALGORITHM" + ".md", "DESIGN" + ".md", "DATASETS" + ".md", "shared" + "/")
    cited = [str(p.relative_to(root)) for p in files
             if any(name in p.read_text() for name in team)]
    assert cited == []


def test_help_shows_the_defaults_a_user_needs(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--epochs EPOCHS", "15"), ("--seed SEED", "0"),
                          ("--log-every LOG_EVERY", "10"), ("--test-size TEST_SIZE", "2000"),
                          ("--lr-decay LR_DECAY", "0.8"), ("--threads THREADS", "half the")):
        after = text.rsplit(flag, 1)[1][:220]  # the help line, not the usage line
        assert f"default: {default}" in after, (flag, after)
    for flag in ("--lr LR", "--batch-size BATCH_SIZE", "--rtol RTOL"):
        assert "default" in text.rsplit(flag, 1)[1][:120], flag  # "the task's ... default"
