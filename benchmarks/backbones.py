"""CPU throughput of candidate backbones, exported as the product exports them, side by side.

    .venv/bin/python -m benchmarks.backbones --archs efficientnet_lite0,efficientnet_lite1,efficientnet_lite2

Each architecture is exported with its ImageNet backbone and a fresh head
(`benchmarks.bench_model.write_model`; throughput does not depend on the weights, the parity check does) at its own input size and run through the server's ONNX Runtime backend at
one batch size; rounds alternate between the models so that load on the machine hits them alike.
Prints images/s per model and the ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from core.contract import ONNX_FILE, read_contract
from engines.runtime import OnnxRuntimeBackend


def measure(archs: list[str], batch: int, rounds: int, seconds: float, threads: int) -> list[dict]:
    from benchmarks.bench_model import write_model

    rows = []
    with tempfile.TemporaryDirectory() as repository:
        models = []
        for arch in archs:
            folder = write_model(Path(repository), arch, None, 1, weights="imagenet")
            contract = read_contract(folder)
            backend = OnnxRuntimeBackend(folder / ONNX_FILE, device="cpu", intra_op_threads=threads)
            images = np.random.default_rng(0).integers(0, 256, (batch, *contract.input_shape), dtype=np.uint8)
            backend.run(images)  # warm-up
            models.append((arch, contract, backend, images, []))
        for _ in range(rounds):
            for arch, contract, backend, images, rates in models:
                done, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds:
                    backend.run(images)
                    done += batch
                rates.append(done / (time.perf_counter() - started))
        for arch, contract, _, _, rates in models:
            rows.append({"arch": arch, "input": contract.input_height, "cam": f"{contract.cam_height}x{contract.cam_width}",
                         "images_per_s": float(np.median(rates)), "rounds": [round(r, 1) for r in rates]})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per model per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = measure([a for a in args.archs.split(",") if a], args.batch, args.rounds, args.seconds, args.threads)
    first = rows[0]["images_per_s"]
    print(f"{'arch':<22}{'input':>6}{'CAM':>6}{'images/s':>10}{'vs first':>10}")
    for row in rows:
        print(f"{row['arch']:<22}{row['input']:>6}{row['cam']:>6}{row['images_per_s']:>10.1f}{row['images_per_s'] / first:>9.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
