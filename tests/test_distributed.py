"""Data-parallel training with two gloo processes on CPU, as torchrun would start them."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.datasets import make_plain_dataset
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.distributed import init_distributed_mode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_rank(rank: int, world_size: int, port: int, data: str, out: str, weights_dir: str) -> None:
    """One torchrun-style process: the environment torchrun sets, then the ordinary `fit`."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from training.trainer import fit

    config = TrainConfig(
        data=data, arch="cyborg_local_tiny", weights="none", image_size=32, epochs=2, batch_size=4,
        lr=0.02, workers=0, device="cpu", out=out, val_fraction=0.25, ema_decay=0.9,
    )  # fmt: skip
    summary = fit(config, progress=False)
    torch.save({"model": summary["model"].state_dict(), "average": summary["average"].state_dict(), "history": summary["history"]},
               Path(weights_dir) / f"rank{rank}.pt")  # fmt: skip


def test_two_gloo_processes_end_with_identical_weights_and_one_checkpoint(tmp_path):
    """With a weight average (--ema-decay) too: each rank keeps one, validated on its shard."""
    data = make_plain_dataset(tmp_path, n_real=10, n_fake=10, size=32)
    out = tmp_path / "run"
    mp.spawn(train_rank, args=(2, free_port(), str(data), str(out), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for key in ("model", "average"):  # the average's batch-norm statistics too, though each rank averaged its own
        for name, tensor in rank0[key].items():
            assert torch.equal(tensor, rank1[key][name]), f"{key} {name}"
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 2 and not any(key.startswith("module.") for key in last["model"])  # the unwrapped model
    for name, tensor in last["training_model"].items():  # the raw weights; "model" holds their average (--ema-decay)
        assert torch.equal(tensor, rank0["model"][name]), name
    for name, tensor in last["model"].items():
        assert torch.equal(tensor, rank0["average"][name]), name
    assert any(not torch.equal(tensor, last["training_model"][name]) for name, tensor in last["model"].items())
    # metrics are reduced over both ranks: the same numbers on each, counting every training image once
    untimed = [[{k: v for k, v in row.items() if k != "train_images_per_s"} for row in r["history"]] for r in (rank0, rank1)]
    assert untimed[0] == untimed[1] and all("val_auc_raw" in row for row in untimed[0])
    val_count = last["data"]["counts"]["val"]["real"] + last["data"]["counts"]["val"]["fake"]
    assert val_count == 4 and len(set(last["val_predictions"]["paths"])) == 4  # each image scored once, across ranks
    assert len(last["val_predictions"]["scores"]) == 4


def test_single_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed_mode("cpu")
    assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the hint is about glibc's allocator")
def test_cpu_allocator_hint_names_the_tunable_until_it_is_set():
    from training.distributed import HUGE_PAGES, cpu_allocator_hint

    assert f"GLIBC_TUNABLES={HUGE_PAGES}" in cpu_allocator_hint({})
    assert HUGE_PAGES in cpu_allocator_hint({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert cpu_allocator_hint({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGES}"}) is None


def test_with_huge_pages_adds_the_tunable_once_and_keeps_the_others():
    from training.distributed import HUGE_PAGES, with_huge_pages

    assert with_huge_pages({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": HUGE_PAGES}
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGES}"
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}
