"""Fixtures the service's tests share."""

from __future__ import annotations

import pytest
from api_fixtures import Clock


@pytest.fixture
def clock():
    """A settable clock for lease expiry (the one true external)."""
    return Clock()
