"""Every notebook under notebooks/ runs top to bottom (small sizes, public API only)."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors


def test_notebooks_exist_and_store_outputs():
    nbformat = pytest.importorskip("nbformat")
    assert len(NOTEBOOKS) >= 2
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.get("execution_count") for c in code), f"{path.name} not executed"


def _code(path) -> str:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()


def _requirements(section: str) -> set[str]:
    """Distribution names listed in pyproject's `dependencies` or one optional extra."""
    text = _pyproject()
    if section == "dependencies":
        block = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
    else:
        block = re.search(rf"^{section} = \[(.*?)\n\]", text, re.S | re.M).group(1)
    names = re.findall(r'"([A-Za-z0-9_.-]+)', block)
    return {n.lower().replace("_", "-") for n in names}


def test_the_notebooks_extra_installs_what_the_notebooks_import():
    """`pip install -e ".[notebooks]"` is enough: every module a notebook imports comes from
    the standard library, chunkattn's dependencies or the notebooks extra."""
    import importlib.metadata
    import sys

    provided = _requirements("dependencies") | _requirements("notebooks")
    assert {"jupyterlab", "ipykernel", "matplotlib", "chex"} <= provided
    dists = importlib.metadata.packages_distributions()
    for path in NOTEBOOKS:
        tree = ast.parse(_code(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module.split(".")[0]]
            else:
                continue
            for mod in mods:
                if mod in sys.stdlib_module_names or mod == "chunkattn":
                    continue
                names = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
                assert names & provided, f"{path.name} imports {mod}, which no install provides"
    readme = (ROOT / "README.md").read_text()
    assert '.venv/bin/pip install -q -e ".[notebooks]"' in readme
    assert ".venv/bin/jupyter lab notebooks/" in readme


def test_notebooks_use_the_public_api_only():
    """chunkattn's top-level names, its public subpackages, and `chunkattn-train` as a command:
    never the trainer's module (`chunkattn.train`) or an underscored name."""
    import chunkattn

    public = set(chunkattn.__all__) | {"nn", "models", "parallel", "variants", "testing"}
    for path in NOTEBOOKS:
        code = _code(path)
        assert "chunkattn.train" not in code and "import train" not in code, path.name
        for name in re.findall(r"\bchunkattn\.(\w+)", code):
            assert name in public, f"{path.name} uses chunkattn.{name}, not public API"
        for names in re.findall(r"from chunkattn(?:\.\w+)* import ([\w, ]+)", code):
            assert not any(n.strip().startswith("_") for n in names.split(",")), path.name
    assert "chunkattn-train" in _code(ROOT / "notebooks" / "03_train_gpt.ipynb")


def test_notebook_01_builds_the_backward_step_by_step():
    code = _code(ROOT / "notebooks" / "01_chunked_attention.ipynb")
    for needed in ("def summary(", "def merge(", "jax.lax.scan", "dP - D", "jax.grad"):
        assert needed in code, needed
    assert code.count("chex.assert_trees_all_close") >= 10
