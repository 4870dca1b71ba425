"""Fixtures shared by several test modules."""

from pathlib import Path

import pytest

from tests.datasets import make_plain_dataset


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for tiny networks: more threads only contend on a 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A plain real/fake folder of 12 + 12 32-px faces with maps, for tiny training runs."""
    return make_plain_dataset(tmp_path_factory.mktemp("tiny"), n_real=12, n_fake=12, size=32)


@pytest.fixture
def on_cuda(monkeypatch):
    """Every engine the model repository opens reports CUDA (the ONNX Runtime CPU session still runs it)."""
    import serving.repository as repository_module

    real = repository_module.load_backend

    def cuda_backend(*args, **kwargs):
        backend = real(*args, **kwargs)
        backend.device = "cuda"
        return backend

    monkeypatch.setattr(repository_module, "load_backend", cuda_backend)
