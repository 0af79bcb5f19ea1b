"""The shape of the tree, as tests: no import cycles among fastca's
packages, the node agent independent of the server, construction of the
issuing engine only inside the Authority, and no reference to a document
the repository does not have."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fastca"
REPO = SRC.parents[1]


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "proto" not in p.relative_to(SRC).parts[:1])


def _unit(module: str) -> str:
    """fastca.authority.stages -> fastca.authority; fastca.errors -> fastca.errors."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(path: Path) -> set[str]:
    """Every fastca module this file imports, wherever the import stands,
    except under ``if TYPE_CHECKING:`` (which never runs)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    found: set[str] = set()
    package = _module_of(path) if path.name == "__init__.py" else _module_of(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("fastca"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("fastca"):
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in _sources():
        unit = _unit(_module_of(path))
        for imported in _runtime_imports(path):
            target = _unit(imported)
            if target != unit and target != "fastca":
                graph[unit].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(set(graph) | {n for targets in graph.values() for n in targets}):
        if node not in index:
            visit(node)
    return found


def test_the_package_graph_has_no_cycles():
    graph = _graph()
    assert "fastca.authority" in graph and "fastca.frontend" in graph      # the scan sees the tree
    assert _cycles(graph) == []


def test_the_data_flow_runs_one_way():
    graph = _graph()
    # frontend -> authn -> authority -> _native / signing / audit, never back.
    for lower, upper in [("fastca.authority", "fastca.frontend"), ("fastca.authn", "fastca.frontend"),
                         ("fastca.authn", "fastca.authority"), ("fastca.signing", "fastca.authority"),
                         ("fastca.audit", "fastca.authority"), ("fastca.batching", "fastca.authority"),
                         ("fastca.ca", "fastca.authority"), ("fastca.agent", "fastca.frontend"),
                         ("fastca.agent", "fastca.authority")]:
        assert upper not in graph.get(lower, set()), f"{lower} imports {upper}"


def test_the_agent_does_not_import_the_server():
    probe = ("import sys, fastca.agent.main; "
             "print(sorted(m for m in sys.modules if m.startswith(('fastca.frontend', 'fastca.authority', "
             "'fastca.batching'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_issuing_engine_is_built_only_inside_the_authority():
    built = []
    for path in _sources():
        text = path.read_text()
        for name in ("IssuerProfile(", "prepare_batch(", "assemble_batch(", "check_issued_batch(", "Batcher("):
            if name in text and "authority" not in path.relative_to(SRC).parts[:1]:
                built.append(f"{path.relative_to(SRC)}: {name}")
    assert built == ["batching.py: Batcher("], built       # its own definition's docstring


_FOREIGN_DOCUMENTS = re.compile(r"ARCHITECTURE\.md|CERT-PROFILE\.md|ISTIO-CONTRACT\.md|PERFORMANCE\.md|"
                                r"MISSION\.md|RELIABILITY\b|\.\./shared|shared/design")
_DOC_REFERENCE = re.compile(r"docs/([a-z0-9-]+\.md)")


def test_no_source_file_refers_to_a_document_outside_the_repository():
    outside, missing = [], []
    for path in sorted(SRC.rglob("*")):
        if path.suffix not in {".py", ".pyx", ".pxd", ".pyi"}:
            continue
        text = path.read_text()
        for line_no, line in enumerate(text.splitlines(), 1):
            if _FOREIGN_DOCUMENTS.search(line):
                outside.append(f"{path.relative_to(SRC)}:{line_no}: {line.strip()}")
            for document in _DOC_REFERENCE.findall(line):
                if not (REPO / "docs" / document).is_file():
                    missing.append(f"{path.relative_to(SRC)}:{line_no}: docs/{document}")
    assert outside == []
    assert missing == []
