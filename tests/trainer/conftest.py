"""Fixtures the trainer's tests share."""

from __future__ import annotations

import pytest
from trainer_helpers import build_models


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A tiny random student and teacher (read only: runs write to their own --out)."""
    return build_models(tmp_path_factory.mktemp("models"))
