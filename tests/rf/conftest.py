"""Fixtures of the `rf` tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: as fast for the small tensors of these tests, and immune to OpenMP
    spin-wait slowdowns (20x here) when other processes share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
