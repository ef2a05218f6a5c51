"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest
from support.engine import DATA, Tokenized, examples


@pytest.fixture(scope="module")
def data():
    return {DATA: Tokenized(examples(64, 0), examples(24, 1))}
