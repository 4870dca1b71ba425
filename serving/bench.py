"""Serving throughput and latency against ONNX Runtime in-process (`cyborg bench serve`).

One run measures, on the same model and images:
- the baselines without a server: the model in ONNX Runtime (the server's own backend class) at
  its best batch fed with tensors, and fed with encoded images decoded and resized in the same
  process by `serving.images` (what the server does for every encoded image);
- the real server, started as a subprocess (its own interpreter and GIL, as in production, so the
  load generator does not steal its event loop): closed-loop clients at each concurrency sending
  raw tensors (Open Inference Protocol ModelInfer, uint8 [1,3,H,W]) and encoded images
  (cyborg.v1.Detector/Detect), then an open-loop Poisson stream of raw-tensor requests at half of
  the peak throughput (or --rate).
Requests are serialized once, before timing, and responses are parsed only when checked, so the
load generator spends its CPU on the network, not on protobuf. Latencies of the open loop are
measured from each request's scheduled time, so a late client never hides server queueing.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from serving import contract as c
from serving.images import decode_image, to_model_input

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
READY_METHOD = "/inference.GRPCInferenceService/ServerReady"
BASELINE_BATCHES = (1, 8, 16, 32, 64)
TARGET_RATIO = 0.95
TARGET_TAIL = 2.0  # p99 <= 2 x p50 at half of peak load
TARGET_CONCURRENCY = 16  # ratios are judged at concurrency >= this

Call = Callable[[bytes], Awaitable[bytes]]


# ---- statistics -----------------------------------------------------------------------------
def summarize(latencies: Sequence[float], seconds: float, errors: int = 0) -> dict:
    """Throughput (requests/s, one image each) and latency percentiles in ms."""
    values = np.asarray(latencies, dtype=np.float64) * 1e3
    if values.size == 0:
        return {"requests": 0, "errors": errors, "seconds": round(seconds, 3), "throughput": 0.0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "requests": int(values.size),
        "errors": errors,
        "seconds": round(seconds, 3),
        "throughput": round(values.size / seconds, 2),
        "p50_ms": round(float(p50), 2),
        "p90_ms": round(float(p90), 2),
        "p99_ms": round(float(p99), 2),
        "mean_ms": round(float(values.mean()), 2),
    }


# ---- images ---------------------------------------------------------------------------------
def synthetic_images(count: int = 32, size: int = 512, seed: int = 0, quality: int = 90) -> list[bytes]:
    """JPEGs of smooth random scenes with fine noise, about the size of a face photo."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, format="JPEG", quality=quality)
        images.append(buffer.getvalue())
    return images


def folder_images(folder: str | os.PathLike[str], limit: int = 256) -> list[bytes]:
    """Up to `limit` image files from a folder (the ones `decode_image` accepts)."""
    from cyborg.errors import UserError

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp"))
    images = []
    for path in paths[:limit]:
        data = path.read_bytes()
        try:
            decode_image(data, name=str(path))
        except UserError:
            continue
        images.append(data)
    if not images:
        raise UserError(f"--images {folder}: no readable JPEG, PNG, WebP or BMP images")
    return images


# ---- baselines without a server -------------------------------------------------------------
def load_backend(version_dir: Path):
    """The server's own ONNX Runtime backend class, configured as the server configures it."""
    from serving.runtime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(version_dir / c.ONNX_FILE, device="auto")


def _timed_loop(step: Callable[[], int], duration: float) -> float:
    """Run `step` (returns images done) for about `duration` s after one warm-up; images/s."""
    step()
    done, started = 0, time.perf_counter()
    while True:
        done += step()
        elapsed = time.perf_counter() - started
        if elapsed >= duration:
            return done / elapsed


def tensor_baseline(backend, tensors: np.ndarray, duration: float, batches: Sequence[int] = BASELINE_BATCHES) -> dict:
    """Engine throughput fed with ready tensors at each batch size; the best one wins."""
    by_batch = {}
    for batch in batches:
        chunk = np.ascontiguousarray(np.resize(tensors, (batch, *tensors.shape[1:])))
        by_batch[batch] = round(_timed_loop(lambda: (backend.run(chunk), batch)[1], duration), 2)
    best = max(by_batch, key=by_batch.get)
    return {"best_batch": best, "throughput": by_batch[best], "by_batch": by_batch}


def decode_baseline(backend, encoded: Sequence[bytes], contract: c.ModelContract, batch: int, duration: float) -> dict:
    """Decode + resize (serving.images) then the engine, at `batch`, all in this process."""
    cursor = iter(_cycle(encoded))

    def step() -> int:
        rows = [to_model_input(decode_image(next(cursor)), contract.input_height, contract.input_width) for _ in range(batch)]
        backend.run(np.stack(rows))
        return batch

    return {"batch": batch, "throughput": round(_timed_loop(step, duration), 2)}


def _cycle(items: Sequence) -> Iterator:
    while True:
        yield from items


# ---- load generators ------------------------------------------------------------------------
async def closed_loop(call: Call, requests: Sequence[bytes], concurrency: int, duration: float, warmup: float) -> dict:
    """`concurrency` clients, each sending its next request as soon as the last one returns."""
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + duration

    async def client(offset: int) -> None:
        nonlocal errors
        index = offset
        while True:
            sent = loop.time()
            if sent >= end:
                return
            try:
                await call(requests[index % len(requests)])
            except Exception:  # noqa: BLE001 - counted; the benchmark reports them
                errors += sent >= start
                continue
            finally:
                index += concurrency
            if sent >= start:
                latencies.append(loop.time() - sent)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return summarize(latencies, max(loop.time(), end) - start, errors) | {"concurrency": concurrency}


async def open_loop(call: Call, requests: Sequence[bytes], rate: float, duration: float, seed: int = 0) -> dict:
    """Poisson arrivals at `rate`/s for `duration` s; latency counted from each scheduled time."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0

    async def one(request: bytes, scheduled: float) -> None:
        nonlocal errors
        try:
            await call(request)
        except Exception:  # noqa: BLE001
            errors += 1
            return
        latencies.append(loop.time() - scheduled)

    tasks = []
    start = loop.time()
    scheduled = start
    index = 0
    while True:
        scheduled += rng.expovariate(rate)
        if scheduled >= start + duration:
            break
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(requests[index % len(requests)], scheduled)))
        index += 1
    await asyncio.gather(*tasks)
    result = summarize(latencies, loop.time() - start, errors)
    tail = result["p99_ms"] / result["p50_ms"] if result["p50_ms"] else None
    return result | {"rate": round(rate, 2), "p99_over_p50": None if tail is None else round(tail, 2)}


# ---- requests on the wire -------------------------------------------------------------------
def tensor_requests(tensors: np.ndarray, model: str, version: int) -> list[bytes]:
    """Serialized ModelInferRequest messages, one uint8 [1,3,H,W] image each."""
    from serving.inference_servicer import INPUT_DATATYPE, messages

    m = messages()
    serialized = []
    for row in tensors:
        request = m.ModelInferRequest(model_name=model, model_version=str(version or ""))
        request.inputs.add(name=c.INPUT_NAME, datatype=INPUT_DATATYPE, shape=[1, *row.shape])
        request.raw_input_contents.append(np.ascontiguousarray(row).tobytes())
        serialized.append(request.SerializeToString())
    return serialized


def image_requests(encoded: Sequence[bytes], model: str, version: int) -> list[bytes]:
    """Serialized cyborg.v1 DetectRequest messages, one encoded image each, no heatmap."""
    from serving.client import detect_request

    return [detect_request(data, model=model, version=version).SerializeToString() for data in encoded]


# ---- the server under test ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(repository: Path, timeout: float = 180.0, extra: Sequence[str] = ()) -> Iterator[str]:
    """`cyborg serve` in a subprocess on free loopback ports; yields its address once ready."""
    import grpc

    from serving.inference_servicer import messages

    from cyborg.errors import UserError

    port = free_port()
    command = [sys.executable, "-m", "cyborg.cli", "--log-level=WARNING", "serve", f"--model-repository={repository}",
               f"--port={port}", "--metrics-port=-1", "--host=127.0.0.1", *extra]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        address = f"127.0.0.1:{port}"
        try:
            m = messages()
            with grpc.insecure_channel(address) as channel:
                ready = channel.unary_unary(READY_METHOD, request_serializer=m.ServerReadyRequest.SerializeToString, response_deserializer=m.ServerReadyResponse.FromString)
                deadline = time.monotonic() + timeout
                while True:
                    if process.poll() is not None:
                        log.seek(0)
                        raise UserError(f"the server exited with {process.returncode}: {log.read().decode(errors='replace')[-2000:]}")
                    try:
                        if ready(m.ServerReadyRequest(), timeout=2).ready:
                            break
                    except grpc.RpcError:
                        pass
                    if time.monotonic() > deadline:
                        raise UserError(f"the server was not ready after {timeout:.0f} s")
                    time.sleep(0.2)
            yield address
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# ---- the whole benchmark --------------------------------------------------------------------
def resolve_model(repository: Path, model: str | None, version: int | None) -> tuple[c.ModelContract, Path]:
    """The contract and folder of the model to benchmark (default: the only/first model, latest version)."""
    from cyborg.errors import UserError

    names = sorted(p.name for p in repository.iterdir() if p.is_dir()) if repository.is_dir() else []
    if not names:
        raise UserError(f"--model-repository {repository}: no model folders")
    name = model or names[0]
    folder = repository / name
    versions = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []
    if not versions:
        raise UserError(f"--model {name}: no version folders under {folder}")
    chosen = version or versions[-1]
    if chosen not in versions:
        raise UserError(f"--version {chosen}: {name} has versions {versions}")
    return c.read_contract(folder / str(chosen)), folder / str(chosen)


async def _measure_server(address: str, requests: dict[str, list[bytes]], baselines: dict[str, Callable[[], float]],
                          concurrency: Sequence[int], duration: float, warmup: float, rate: float | None) -> dict:  # fmt: skip
    """The sweep, each server window right after its own baseline window, then the Poisson run."""
    import grpc

    from serving.client import DETECT_METHOD, max_message_options

    async with grpc.aio.insecure_channel(address, options=max_message_options()) as channel:
        calls = {"tensor": channel.unary_unary(INFER_METHOD), "image": channel.unary_unary(DETECT_METHOD)}
        for kind, call in calls.items():  # each path works before it is timed
            await call(requests[kind][0], timeout=120)
        sweep = []
        for level in concurrency:
            for kind in ("tensor", "image"):
                baseline = baselines[kind]()
                result = await closed_loop(calls[kind], requests[kind], level, duration, warmup)
                ratio = round(result["throughput"] / baseline, 3) if baseline else None
                sweep.append({"kind": kind} | result | {"baseline": baseline, "ratio": ratio})
        peak = max(r["throughput"] for r in sweep if r["kind"] == "tensor")
        poisson = await open_loop(calls["tensor"], requests["tensor"], rate or max(peak / 2, 0.5), max(duration, 1.0))
        return {"sweep": sweep, "peak_tensor_throughput": peak, "poisson": poisson | {"kind": "tensor"}}


def run_benchmark(
    repository: Path,
    model: str | None = None,
    version: int | None = None,
    concurrency: Sequence[int] = (1, 4, 16, 32),
    duration: float = 10.0,
    rate: float | None = None,
    images: str | None = None,
    warmup: float | None = None,
    server_args: Sequence[str] = (),
) -> dict:
    """The full report as a dict (what `--json` prints).

    The best batch is found once; then every server measurement is paired with a baseline
    measurement of the same length taken just before it, and its ratio is to that baseline, so
    load from other processes that drifts during the run does not bias the comparison.
    """
    contract, folder = resolve_model(Path(repository), model, version)
    encoded = folder_images(images) if images else synthetic_images()
    tensors = np.stack([to_model_input(decode_image(data), contract.input_height, contract.input_width) for data in encoded])
    warmup = min(1.0, duration / 4) if warmup is None else warmup
    load_before = os.getloadavg()

    backend = load_backend(folder)
    search = tensor_baseline(backend, tensors, max(duration / 4, 0.5))
    best = search["best_batch"]
    measured_baselines: dict[str, list[float]] = {"tensor": [], "image": []}

    def baseline(kind: str) -> Callable[[], float]:
        def measure() -> float:
            if kind == "tensor":
                value = tensor_baseline(backend, tensors, duration, batches=(best,))["throughput"]
            else:
                value = decode_baseline(backend, encoded, contract, best, duration)["throughput"]
            measured_baselines[kind].append(value)
            return value

        return measure

    requests = {
        "tensor": tensor_requests(tensors, contract.name, contract.version),
        "image": image_requests(encoded, contract.name, contract.version),
    }
    with server_process(Path(repository), extra=server_args) as address:
        measured = asyncio.run(
            _measure_server(address, requests, {k: baseline(k) for k in requests}, concurrency, duration, warmup, rate)
        )
    return {
        "model": {"name": contract.name, "version": contract.version, "architecture": contract.architecture,
                  "input": list(contract.input_shape), "path": str(folder)},  # fmt: skip
        "server": {"mode": "subprocess", "args": list(server_args), "providers": getattr(backend, "providers", []), "cpus": os.cpu_count()},
        "load_average": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "images": {"count": len(encoded), "source": images or "synthetic 512x512 JPEG", "mean_bytes": int(np.mean([len(e) for e in encoded]))},
        "settings": {"concurrency": list(concurrency), "duration_s": duration, "warmup_s": warmup},
        "baseline": {
            "best_batch": best,
            "search": search["by_batch"],
            "tensor": round(float(np.median(measured_baselines["tensor"])), 2),
            "image": round(float(np.median(measured_baselines["image"])), 2),
        },
        "sweep": measured["sweep"],
        "peak_tensor_throughput": measured["peak_tensor_throughput"],
        "poisson": measured["poisson"],
        "targets": targets(measured["sweep"], measured["poisson"]),
    }


def targets(sweep: list[dict], poisson: dict) -> dict:
    """The issue's targets, judged on this run (None where the run had no concurrency >= 16)."""
    def best_ratio(kind: str) -> float | None:
        ratios = [r["ratio"] for r in sweep if r["kind"] == kind and r["concurrency"] >= TARGET_CONCURRENCY and r["ratio"] is not None]
        return max(ratios) if ratios else None

    tensor, image, tail = best_ratio("tensor"), best_ratio("image"), poisson.get("p99_over_p50")
    return {
        "tensor_ratio": tensor,
        "image_ratio": image,
        "poisson_p99_over_p50": tail,
        "tensor_met": None if tensor is None else tensor >= TARGET_RATIO,
        "image_met": None if image is None else image >= TARGET_RATIO,
        "tail_met": None if tail is None else tail <= TARGET_TAIL,
    }


def format_report(report: dict) -> str:
    """The human-readable table."""
    model, base = report["model"], report["baseline"]
    lines = [
        f"model {model['name']} v{model['version']} ({model['architecture']}, input {model['input']}), "
        f"server as a {report['server']['mode']}, {report['server']['cpus']} CPUs, providers {report['server']['providers']}",
        f"baselines without a server (median of the paired windows), at batch {base['best_batch']}: "
        f"tensors {base['tensor']:.1f} images/s, decode + engine {base['image']:.1f} images/s "
        f"(batch search: {', '.join(f'{b}: {v}' for b, v in base['search'].items())})",
        f"load average {report['load_average']['before']} before, {report['load_average']['after']} after",
        "",
        f"{'requests':<9}{'conc.':>6}{'images/s':>10}{'baseline':>10}{'ratio':>7}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'errors':>7}",
    ]
    rows = [(row["kind"], row["concurrency"], row) for row in report["sweep"]]
    rows.append(("poisson", f"{report['poisson']['rate']}/s", report["poisson"]))
    for label, level, row in rows:
        lines.append(
            f"{label:<9}{level!s:>6}{row['throughput']:>10.1f}{_fmt(row.get('baseline'), '.1f'):>10}{_fmt(row.get('ratio'), '.2f'):>7}"
            f"{_fmt(row['p50_ms'], '.1f'):>9}{_fmt(row['p90_ms'], '.1f'):>9}{_fmt(row['p99_ms'], '.1f'):>9}{row['errors']:>7}"
        )
    t = report["targets"]
    lines += [
        "",
        f"targets: tensor ratio at concurrency >= {TARGET_CONCURRENCY} {_fmt(t['tensor_ratio'], '.2f')} (>= {TARGET_RATIO}: {_yes(t['tensor_met'])}), "
        f"image ratio {_fmt(t['image_ratio'], '.2f')} (>= {TARGET_RATIO}: {_yes(t['image_met'])}), "
        f"p99/p50 at half of peak {_fmt(t['poisson_p99_over_p50'], '.2f')} (<= {TARGET_TAIL}: {_yes(t['tail_met'])})",
    ]
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _yes(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")
