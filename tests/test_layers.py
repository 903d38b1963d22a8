"""The import-layering contract (pyproject.toml [tool.importlinter]) and no import cycles.

Runs the real `lint-imports` on the package, then on a copy of it with one planted
upward import (the store importing the CLI), which must break the contract.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(src: Path) -> subprocess.CompletedProcess:
    # The copy under `src` must be the one grimp imports: it comes first on the path.
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=src, env=env, capture_output=True, text=True, timeout=300)


def test_layering_contract_holds():
    res = _lint(ROOT / "src")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 kept, 0 broken" in res.stdout


def test_planted_upward_import_breaks_the_contract(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "embedlens", src / "embedlens",
                    ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    store = src / "embedlens" / "store.py"
    store.write_text(store.read_text() + "\n\nimport embedlens.cli  # planted: bottom imports top\n")
    res = _lint(src)
    assert res.returncode != 0
    assert "BROKEN" in res.stdout and "embedlens.store -> embedlens.cli" in res.stdout


def _cycles(package: str) -> list[list[str]]:
    """Strongly connected components (> 1 module) of the module import graph (Tarjan)."""
    import grimp

    graph = grimp.build_graph(package)
    adj = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in adj:
        if m not in index:
            visit(m)
    return out


def test_no_import_cycles():
    pytest.importorskip("grimp")
    assert _cycles("embedlens") == []


def _documented_modules() -> set[str]:
    """The module paths the "Where things live" map of docs/architecture.md names (a row's
    later bare names are in the directory of its first path)."""
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    out: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        names = re.findall(r"`([^`]+)`", line.split(" | ")[0])
        base = ""
        for name in names:
            if "/" in name:
                base = name if name.endswith("/") else name.rsplit("/", 1)[0] + "/"
                path = name
            else:
                path = base + name
            if path.endswith(".py"):
                out.add(path)
    return out


def test_where_things_live_map_matches_the_tree():
    src = ROOT / "src" / "embedlens"
    actual = {str(p.relative_to(src)) for p in src.rglob("*.py")
              if p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts}
    documented = _documented_modules()
    assert documented - actual == set(), "the map names modules that do not exist"
    assert actual - documented == set(), "modules missing from docs/architecture.md's map"


def test_every_methods_citation_points_at_a_section_of_docs_methods():
    """Code, rules, notebooks and docs cite "docs/methods.md §N": the file is the project's
    own, and every cited section exists in it."""
    import re

    methods = (ROOT / "docs" / "methods.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", methods, flags=re.M))
    cited: dict[str, set[str]] = {}
    for folder in ("src", "rules", "notebooks", "workflow", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".smk", ".ipynb", ".md", ".yaml") and "__pycache__" not in path.parts:
                for m in re.finditer(r"methods\.md\W{0,3}§\s?(\d+)", path.read_text(errors="ignore")):
                    cited.setdefault(m.group(1), set()).add(str(path.relative_to(ROOT)))
    assert cited, "no citation found: the pattern is wrong"
    assert set(cited) <= sections, {s: sorted(p) for s, p in cited.items() if s not in sections}
    bare = [str(p.relative_to(ROOT)) for folder in ("src", "rules", "notebooks")
            for p in (ROOT / folder).rglob("*.py")
            if re.search(r"(?<![\w/.-])methods\.md", p.read_text())]
    assert bare == [], f"cite docs/methods.md, not a bare methods.md: {bare}"
