from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import Server  # noqa: E402


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One server per test module (cheap: ~50 ms to start)."""
    s = Server()
    s.start()
    try:
        yield s
    finally:
        s.dispose()
