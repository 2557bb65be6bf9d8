"""The README's two set-up commands stay true: CI runs the test command verbatim."""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

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


# One way to run commands: the venv's own programs (`.venv/bin/...`) from the repository root,
# so that every README command works verbatim in a fresh shell after the set-up command.
VENV = ".venv/bin/"
PROGRAMS = ("python", "python3", "pip", "pip3", "pytest", "jupyter", "ruff", "chunkattn-train")


def _shell_commands(block: str) -> list[str]:
    """The simple commands of a bash block: continuations joined, comments and env vars dropped."""
    cmds = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        for part in re.split(r"&&|\|\||;|\|", line):
            words = part.split()
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
                words.pop(0)  # VAR=value prefixes
            if words:
                cmds.append(" ".join(words))
    return cmds


def _not_through_the_venv(text: str) -> list[str]:
    """Commands in README text that do not run through `.venv/bin/` (the set-up's venv excepted).

    Every command of a fenced bash block counts, and inline code that starts with a program name
    (`python bench/speed.py`, `pip install ...`, `chunkattn-train ...`).
    """
    bad = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in _shell_commands(block):
            if not cmd.startswith(VENV) and cmd != "python3 -m venv .venv":
                bad.append(cmd)
    for span in re.findall(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)", text):
        words = span.split()
        # A bare name (`chunkattn-train`) names the program; with arguments it is a command.
        if len(words) > 1 and words[0] in PROGRAMS and span != "python3 -m venv .venv":
            bad.append(" ".join(words))
    return bad


def test_every_readme_command_runs_through_the_venv():
    text = (ROOT / "README.md").read_text()
    assert _not_through_the_venv(text) == []
    assert "nothing needs activating" in text.split("## Set up", 1)[1].split("\n## ", 1)[0]


def test_the_venv_check_catches_bare_commands():
    text = (
        "```bash\nchunkattn-train --out runs/gpt\n.venv/bin/python -c 1 && pytest -q\n"
        "CHUNKATTN_FUZZ=long .venv/bin/python -m pytest \\\n    -q   # fine\n```\n"
        "Rerun: `python bench/speed.py`, `pip install -e .`, `--quick` and `.venv/bin/pip list`;\n"
        "`chunkattn-train` names the program."
    )
    assert _not_through_the_venv(text) == [
        "chunkattn-train --out runs/gpt",
        "pytest -q",
        "python bench/speed.py",
        "pip install -e .",
    ]


def test_readme_programs_and_scripts_exist():
    """Every `.venv/bin/X` is the venv's python/pip, one of our scripts or jupyter (the
    notebooks extra), and every bench/tests script a README command runs is in the repo."""
    text = (ROOT / "README.md").read_text()
    scripts = re.search(
        r"\[project\.scripts\]\n(.*?)\n\n", (ROOT / "pyproject.toml").read_text(), re.S
    )
    ours = re.findall(r"^([\w-]+)\s*=", scripts.group(1), re.M)
    assert "chunkattn-train" in ours
    used = set(re.findall(r"\.venv/bin/([\w-]+)", text))
    assert used <= {"python", "pip", "jupyter", "activate", *ours}, used
    for path in set(re.findall(r"\b((?:bench|tests)/[\w/]+\.py)\b", text)):
        assert (ROOT / path).is_file(), f"README runs {path}, which does not exist"


def test_the_installed_chunkattn_train_runs_from_the_venv():
    exe = ROOT / ".venv" / "bin" / "chunkattn-train"
    if not exe.exists():
        pytest.skip("no .venv here (CI creates it with the README's set-up command)")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: chunkattn-train" in proc.stdout, proc.stderr[-2000:]
