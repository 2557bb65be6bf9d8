"""The README's two set-up commands stay true: CI runs the test command verbatim."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup)


def test_readme_has_exactly_two_setup_commands():
    cmds = _commands()
    assert len(cmds) == 2, cmds
    assert "bench/memory_vs_seqlen.py" in cmds[0] and "pytest" in cmds[1]
    script = re.search(r"(bench/\S+\.py)", cmds[0]).group(1)
    assert (ROOT / script).is_file(), f"the README's main job {script} does not exist"


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _commands()[1] in ci, "CI must run the README's test command verbatim"
