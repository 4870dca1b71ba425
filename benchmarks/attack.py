"""The amplification bench: small requests that cost the server much, and what a normal caller sees.

    python -m benchmarks.attack [--model-repository models] [--duration 30] [--attackers 6]

Starts `cyborg serve` as a subprocess (benchmarks.serve.server_process), measures a normal request
(a 512x512 JPEG, Detect with a PNG heatmap) alone, then again while `--attackers` clients loop
over the amplification cases of issue 12: a 7999x8000 PNG (a few KB on the wire) with each heatmap
kind, a DetectBatch of 12 of them, and a ModelInfer of 200 images at the model's input size. It
prints one JSON object: the server's peak RSS (VmHWM), the normal request's p50/p99 idle and under
attack, and how the attack requests were answered (status code counts).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


def bomb_png(width: int = 7999, height: int = 8000) -> bytes:
    """A bilevel PNG that is a few KB on the wire and 64 Mpixels decoded."""
    buffer = io.BytesIO()
    Image.new("1", (width, height), 1).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def normal_jpeg(size: int = 512, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(latencies: list[float]) -> dict:
    values = np.asarray(latencies) * 1e3
    return {"n": len(values), "p50_ms": round(float(np.percentile(values, 50)), 1), "p99_ms": round(float(np.percentile(values, 99)), 1)}


def measure_normal(stub, request, count: int, stop: threading.Event | None = None, pause: float = 0.05, timings: list | None = None) -> list[float]:
    """Client latencies (s) of `count` normal requests; the server's own timings of each go to `timings`."""
    import grpc

    latencies = []
    for _ in range(count):
        if stop is not None and stop.is_set():
            break
        started = time.perf_counter()
        try:
            response = stub.Detect(request, timeout=60)
        except grpc.RpcError as error:
            print(f"normal request failed: {error.code().name}: {error.details()}", file=sys.stderr)
            continue
        latencies.append(time.perf_counter() - started)
        if timings is not None:
            t = response.timings
            timings.append((t.decode_ms, t.queue_ms, t.compute_ms, t.total_ms))
        time.sleep(pause)
    return latencies


def breakdown(timings: list) -> dict:
    """p50 / p99 (ms) of each part of the server's time for the normal request; `after` is the rest
    of the server time (the heatmap, the response)."""
    if not timings:
        return {}
    values = np.asarray(timings)
    parts = {"decode": values[:, 0], "queue": values[:, 1], "compute": values[:, 2], "after": values[:, 3] - values[:, :3].sum(1), "server_total": values[:, 3]}
    return {name: [round(float(np.percentile(v, 50)), 1), round(float(np.percentile(v, 99)), 1)] for name, v in parts.items()}


def attacker(address: str, index: int, cases: list, stop: threading.Event, outcomes: collections.Counter, lock: threading.Lock) -> None:
    import grpc

    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 64 << 20)]) as channel:
        calls = {name: (channel.unary_unary(method), payload) for name, method, payload in cases}
        names = list(calls)
        turn = index
        while not stop.is_set():
            name = names[turn % len(names)]
            turn += 1
            call, payload = calls[name]
            try:
                call(payload, timeout=120)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            with lock:
                outcomes[f"{name}: {code}"] += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", default="models")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of attack (default: 30)")
    parser.add_argument("--attackers", type=int, default=6, help="attacking clients (default: 6)")
    parser.add_argument("--idle-requests", type=int, default=60)
    parser.add_argument("--server-flag", action="append", default=[], help="extra `cyborg serve` flag (repeatable)")
    parser.add_argument("--cases", default="", help="comma-separated case numbers to send (1-5, default: all)")
    args = parser.parse_args(argv)

    import grpc

    from benchmarks.serve import resolve_model, server_process
    from serving.inference_servicer import messages
    from serving.proto.cyborg.v1 import detector_pb2 as pb
    from serving.proto.cyborg.v1 import detector_pb2_grpc as pb_grpc

    contract, _ = resolve_model(Path(args.model_repository), None, None)
    bomb = bomb_png()
    detect = "/cyborg.v1.Detector/Detect"
    m = messages()
    rows = np.random.default_rng(1).integers(0, 256, (200, *contract.input_shape), dtype=np.uint8)
    infer = m.ModelInferRequest(model_name=contract.name)
    infer.inputs.add(name=contract.input_name, datatype="UINT8", shape=list(rows.shape))
    infer.raw_input_contents.append(rows.tobytes())
    cases = [
        ("bomb none", detect, pb.DetectRequest(image=bomb).SerializeToString()),
        ("bomb png", detect, pb.DetectRequest(image=bomb, heatmap=pb.HEATMAP_PNG).SerializeToString()),
        ("bomb overlay", detect, pb.DetectRequest(image=bomb, heatmap=pb.HEATMAP_OVERLAY).SerializeToString()),
        ("batch of 12 bombs", "/cyborg.v1.Detector/DetectBatch",
         pb.DetectBatchRequest(requests=[pb.DetectRequest(image=bomb, heatmap=pb.HEATMAP_OVERLAY)] * 12).SerializeToString()),
        ("ModelInfer 200 rows", "/inference.GRPCInferenceService/ModelInfer", infer.SerializeToString()),
    ]  # fmt: skip
    if args.cases:
        cases = [cases[int(number) - 1] for number in args.cases.split(",")]
    normal = pb.DetectRequest(image=normal_jpeg(), heatmap=pb.HEATMAP_PNG)
    report = {"bomb_png_bytes": len(bomb), "attack_cases": [name for name, _, _ in cases], "attackers": args.attackers, "duration_s": args.duration}
    with server_process(Path(args.model_repository), extra=args.server_flag) as (address, pid):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.DetectorStub(channel)
            measure_normal(stub, normal, 10)  # warm
            report["rss_idle_mb"] = round(rss_mb(pid))
            idle_timings, under_timings = [], []
            report["normal_idle"] = percentiles(measure_normal(stub, normal, args.idle_requests, timings=idle_timings))
            stop, lock, outcomes = threading.Event(), threading.Lock(), collections.Counter()
            threads = [threading.Thread(target=attacker, args=(address, i, cases, stop, outcomes, lock)) for i in range(args.attackers)]
            for thread in threads:
                thread.start()
            time.sleep(2.0)  # let the attack build up
            ends = time.monotonic() + args.duration
            under = []
            while time.monotonic() < ends:
                under += measure_normal(stub, normal, 1, timings=under_timings)
            stop.set()
            for thread in threads:
                thread.join(180)
            report["normal_under_attack"] = percentiles(under)
            report["server_ms_idle_p50_p99"] = breakdown(idle_timings)
            report["server_ms_under_attack_p50_p99"] = breakdown(under_timings)
            report["peak_rss_mb"] = round(peak_rss_mb(pid))
            report["attack_outcomes"] = dict(sorted(outcomes.items()))
    report["p99_ratio"] = round(report["normal_under_attack"]["p99_ms"] / report["normal_idle"]["p99_ms"], 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
