"""Shared fixtures; the model builders live in ``tests/helpers.py``."""

from __future__ import annotations

from tests.helpers import TINY, TINY_VARIANTS, tiny_vit  # noqa: F401

import pytest
import torch


@pytest.fixture
def tiny_images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)
