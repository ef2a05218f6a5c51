"""The docs name real places: every path docs/architecture.md mentions exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"


def test_every_path_in_the_architecture_doc_exists():
    named = set(re.findall(r"`((?:qlora|orchestrator|conf|sweeps|tests|bench|docs)/[\w./-]*)`",
                           DOC.read_text()))
    assert len(named) > 30
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_no_file_of_the_packages_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for d in ("qlora", "orchestrator")
            for p in (REPO / d).rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def _layers() -> dict[str, int]:
    """Package -> layer, from the table of docs/architecture.md (the driver row: '' -> top)."""
    section = DOC.read_text().split("## Layers inside `orchestrator/`", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for number, names in re.findall(r"^\| (\d+) \| ([^|]+) \|", section, re.M):
        for name in re.findall(r"`(\w+)`", names) or [""]:
            layers[name] = int(number)
    return layers


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every `orchestrator.*` module `path` imports, at the top, in a function or for typing."""
    import ast

    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(node.lineno, n) for n in names[:1] if n.startswith("orchestrator.")]
    return out


def test_no_import_runs_against_the_layer_order():
    layers = _layers()
    assert layers.keys() >= {"config", "search", "cluster", "tracking", ""}, layers
    root = REPO / "orchestrator"
    packages = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= layers.keys(), f"packages missing from the doc's table: {packages - set(layers)}"

    def layer_of(parts: list[str]) -> tuple[str, int]:
        name = parts[0] if parts[0] in packages else ""  # a module at the top: the driver
        return name, layers[name]

    wrong = []
    for path in root.rglob("*.py"):
        mine, my_layer = layer_of(list(path.relative_to(root).parts))
        for line, module in _imports(path):
            theirs, their_layer = layer_of(module.split(".")[1:])
            if theirs != mine and (their_layer > my_layer or (their_layer == my_layer)):
                if mine == "" and theirs == "":
                    continue  # the driver's modules use each other
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not wrong, "imports against the layer order in docs/architecture.md:\n" + "\n".join(wrong)
