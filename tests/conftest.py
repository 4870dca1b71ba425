"""Fixtures shared by several test modules."""

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for tiny networks: more threads only contend on a 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
