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
