"""Cache folders written whole: built under a temporary name beside their place, then renamed in.

A reader that finds the folder (with its `meta.json`) finds it complete; a build killed half-way
leaves only a `.<name>-*` folder, which no reader looks at.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["new_folder"]


@contextlib.contextmanager
def new_folder(folder: Path) -> Iterator[Path]:
    """A fresh folder beside `folder` to fill; when the block ends without an error it replaces
    `folder` (an unfinished one left by a killed build included); otherwise it is removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
