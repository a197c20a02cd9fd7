"""Fixtures shared by several test modules (plain helpers live in tests/utils.py)."""

from __future__ import annotations

import pytest
import torch

from tests.utils import DEVICES


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each test that takes ``device`` runs on CPU and, where there is one, on CUDA."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: they gain nothing from two threads
    (OpenMP hand-off costs more than the work) and lose a lot when other processes load
    the CPU. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
