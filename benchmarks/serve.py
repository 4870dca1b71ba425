"""Serving throughput and latency against ONNX Runtime in-process (`cyborg bench serve`).

One run measures, on the same model and images:
- the baselines without a server: the model in ONNX Runtime (the server's own backend class) at
  its best batch fed with tensors, and fed with encoded images decoded and resized in the same
  process by `core.images` (what the server does for every encoded image);
- the real server, started as a subprocess (its own interpreter and GIL, as in production, so the
  load generator does not steal its event loop): closed-loop clients at each concurrency sending
  raw tensors (Open Inference Protocol ModelInfer, uint8 [1,3,H,W]) and encoded images
  (cyborg.v1.Detector/Detect), then an open-loop Poisson stream of raw-tensor requests at half of
  the peak throughput (or --rate).
The server's maximum batch size is set to the baseline's best batch; each sweep point alternates
baseline and server windows so background load falls on both alike; images per CPU-second (server
plus load generator against the baseline process) is reported beside wall-clock throughput, and a
simulated perfect batcher on the measured engine shows the best tail latency the engine allows.
Requests are serialized once, before timing, and responses are parsed only when checked, so the
load generator spends its CPU on the network, not on protobuf. Latencies of the open loop are
measured from each request's scheduled time, so a late client never hides server queueing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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

from core import contract as c
from core.images import decode_image, image_files, prepare

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
READY_METHOD = "/inference.GRPCInferenceService/ServerReady"
BASELINE_BATCHES = (1, 8, 16, 32, 64)
TARGET_RATIO = 0.95
TARGET_TAIL = 2.0  # p99 <= 2 x p50 at half of peak load
TARGET_CONCURRENCY = 16  # ratios are judged at concurrency >= this

Call = Callable[[bytes], Awaitable[bytes]]


# ---- measurement windows -------------------------------------------------------------------
@dataclasses.dataclass
class Window:
    """What one or more measurement windows saw: images done, wall and CPU seconds, latencies."""

    images: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # of every process doing the work (server + load generator, or the baseline)
    errors: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)

    def add(self, other: Window) -> Window:
        self.images += other.images
        self.seconds += other.seconds
        self.cpu_seconds += other.cpu_seconds
        self.errors += other.errors
        self.latencies += other.latencies
        return self

    @property
    def throughput(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def per_cpu_second(self) -> float:
        return self.images / self.cpu_seconds if self.cpu_seconds else 0.0


def summarize(window: Window) -> dict:
    """Throughput (images/s, one image a request), images per CPU-second, latency percentiles in ms."""
    values = np.asarray(window.latencies, dtype=np.float64) * 1e3
    result = {
        "requests": window.images,
        "errors": window.errors,
        "seconds": round(window.seconds, 3),
        "throughput": round(window.throughput, 2),
        "per_cpu_second": round(window.per_cpu_second, 2),
    }
    if values.size == 0:
        return result | {"p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return result | {"p50_ms": round(float(p50), 2), "p90_ms": round(float(p90), 2), "p99_ms": round(float(p99), 2), "mean_ms": round(float(values.mean()), 2)}


class CpuMeter:
    """CPU seconds used so far by this process and the given others (Linux /proc; else this process only)."""

    def __init__(self, *pids: int):
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __call__(self) -> float:
        total = time.process_time()
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime, all threads
        return total


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
    from core.errors import UserError

    paths = image_files(Path(folder), flag="--images")
    images = []
    for path in paths[:limit]:
        data = Path(path).read_bytes()
        try:
            decode_image(data, name=str(path))
        except UserError:
            continue
        images.append(data)
    if not images:
        raise UserError(f"--images {folder}: no readable JPEG, PNG, WebP or BMP images")
    return images


# ---- baselines without a server -------------------------------------------------------------
def load_backend(version_dir: Path, contract: c.ModelContract | None = None):
    """The engine the server picks for this version with its default settings (`engines.runtime.load_backend`,
    backend and device "auto": a TensorRT plan on a GPU where one can run, else ONNX Runtime's best provider)."""
    from engines.runtime import load_backend as engine_for

    return engine_for(version_dir, contract or c.read_contract(version_dir, verify=False))


def _timed_loop(step: Callable[[], int], duration: float) -> Window:
    """Run `step` (returns images done) for about `duration` s after one warm-up step."""
    step()
    done, cpu, started = 0, time.process_time(), time.perf_counter()
    while True:
        done += step()
        elapsed = time.perf_counter() - started
        if elapsed >= duration:
            return Window(images=done, seconds=elapsed, cpu_seconds=time.process_time() - cpu)


def tensor_window(backend, tensors: np.ndarray, batch: int, duration: float) -> Window:
    """The engine fed with ready uint8 tensors, `batch` rows a run."""
    chunk = np.ascontiguousarray(np.resize(tensors, (batch, *tensors.shape[1:])))
    return _timed_loop(lambda: (backend.run(chunk), batch)[1], duration)


def decode_window(backend, encoded: Sequence[bytes], contract: c.ModelContract, batch: int, duration: float) -> Window:
    """Decode + resize (core.images) then the engine, `batch` images a run, all in this process."""
    cursor = iter(_cycle(encoded))

    def step() -> int:
        rows = [prepare(decode_image(next(cursor)), contract) for _ in range(batch)]
        backend.run(np.stack(rows))
        return batch

    return _timed_loop(step, duration)


def best_batch(backend, tensors: np.ndarray, duration: float, batches: Sequence[int] = BASELINE_BATCHES) -> tuple[int, dict[int, float]]:
    """The batch size at which the engine is fastest on tensors, and images/s at each size tried.

    Two passes in opposite orders, `duration` per size in all, so drifting background load does
    not favour the sizes measured first or last.
    """
    totals = {batch: Window() for batch in batches}
    for order in (list(batches), list(reversed(batches))):
        for batch in order:
            totals[batch].add(tensor_window(backend, tensors, batch, duration / 2))
    by_batch = {batch: round(window.throughput, 2) for batch, window in totals.items()}
    return max(by_batch, key=by_batch.get), by_batch


def _cycle(items: Sequence) -> Iterator:
    while True:
        yield from items


# ---- load generators ------------------------------------------------------------------------
async def closed_loop(call: Call, requests: Sequence[bytes], concurrency: int, duration: float, warmup: float, cpu: CpuMeter) -> Window:
    """`concurrency` clients, each sending its next request as soon as the last one returns.

    Counted: the requests that complete inside the `duration` window that follows `warmup`
    (what perf_analyzer counts), so the server is fully loaded for the whole window; requests
    still in flight at its end are awaited but not counted.
    """
    window = Window(seconds=duration)
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + duration
    marks: dict[str, float] = {}
    loop.call_at(start, lambda: marks.setdefault("start", cpu()))
    loop.call_at(end, lambda: marks.setdefault("end", cpu()))

    async def client(offset: int) -> None:
        index = offset
        while (sent := loop.time()) < end:
            request = requests[index % len(requests)]
            index += concurrency
            try:
                await call(request)
            except Exception:  # noqa: BLE001 - counted; the benchmark reports them
                window.errors += start <= loop.time() <= end
                continue
            if start <= (done := loop.time()) <= end:
                window.latencies.append(done - sent)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    window.images = len(window.latencies)
    window.cpu_seconds = marks.get("end", cpu()) - marks.get("start", cpu())
    return window


async def open_loop(call: Call, requests: Sequence[bytes], rate: float, duration: float, cpu: CpuMeter, seed: int = 0) -> Window:
    """Poisson arrivals at `rate`/s for `duration` s; latency counted from each scheduled time."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    window = Window()

    async def one(request: bytes, scheduled: float) -> None:
        try:
            await call(request)
        except Exception:  # noqa: BLE001
            window.errors += 1
            return
        window.latencies.append(loop.time() - scheduled)

    tasks = []
    start, cpu_start = loop.time(), cpu()
    scheduled = start
    while (scheduled := scheduled + rng.expovariate(rate)) < start + duration:
        if (delay := scheduled - loop.time()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(requests[len(tasks) % len(requests)], scheduled)))
    await asyncio.gather(*tasks)
    window.images, window.seconds, window.cpu_seconds = len(window.latencies), loop.time() - start, cpu() - cpu_start
    return window


def ideal_batcher(rate: float, by_batch: dict[int, float], max_batch: int, arrivals: int = 20000, seed: int = 0) -> dict:
    """Latency of a perfect dynamic batcher on this engine under Poisson arrivals at `rate`/s.

    A simulation with no overhead at all: one engine that, whenever it is free, takes every
    waiting request (up to `max_batch`) and runs them in the time the baseline measured for that
    batch size (`by_batch`: images/s, interpolated between the sizes tried). It tells what tail a
    server on this engine could reach at best: where batching saves little per image (CPUs), a
    request that arrives during a batch waits for it, and p99/p50 is set by that queueing.
    """
    sizes = np.array(sorted(by_batch), dtype=np.float64)
    seconds = np.array([size / by_batch[int(size)] for size in sizes])
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / rate, arrivals))
    latencies = np.empty(arrivals)
    free, first = 0.0, 0
    while first < arrivals:
        start = max(free, times[first])
        last = min(int(np.searchsorted(times, start, side="right")), first + max_batch, arrivals)
        last = max(last, first + 1)
        free = start + float(np.interp(last - first, sizes, seconds))
        latencies[first:last] = free - times[first:last]
        first = last
    p50, p99 = np.percentile(latencies[arrivals // 10 :], [50, 99]) * 1e3
    return {"p50_ms": round(float(p50), 2), "p99_ms": round(float(p99), 2), "p99_over_p50": round(float(p99 / p50), 2)}


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


def image_requests(encoded: Sequence[bytes], model: str, version: int, input_kind: str = "") -> list[bytes]:
    """Serialized cyborg.v1 DetectRequest messages, one encoded image each, no heatmap; `input_kind`
    "photo" or "auto" sends them through face detection and alignment (one request, many faces)."""
    from serving.client import detect_request

    return [detect_request(data, model=model, version=version, input_kind=input_kind).SerializeToString() for data in encoded]


# ---- the server under test ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(repository: Path, timeout: float = 180.0, extra: Sequence[str] = ()) -> Iterator[tuple[str, int]]:
    """`cyborg serve` in a subprocess on a free loopback port; yields (address, pid) once ready."""
    import grpc

    from serving.inference_servicer import messages

    from core.errors import UserError

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
            yield address, process.pid
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
    from core.errors import UserError

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


Measure = Callable[[], Window]


async def _measure_server(address: str, pid: int, requests: dict[str, list[bytes]], baselines: dict[str, Measure],
                          ceiling: Callable[[int], float], concurrency: Sequence[int], duration: float, warmup: float,
                          rounds: int, rate: float | None) -> dict:  # fmt: skip
    """The sweep (each point: `rounds` pairs of a baseline window then a server window), then the Poisson run."""
    import grpc

    from serving.client import DETECT_METHOD, max_message_options

    cpu = CpuMeter(pid)
    async with grpc.aio.insecure_channel(address, options=max_message_options()) as channel:
        calls = {"tensor": channel.unary_unary(INFER_METHOD), "image": channel.unary_unary(DETECT_METHOD)}
        for kind, call in calls.items():  # each path works before it is timed
            await call(requests[kind][0], timeout=120)
        sweep = []
        for level in concurrency:
            for kind in ("tensor", "image"):
                served, base = Window(), Window()
                for _ in range(rounds):
                    base.add(baselines[kind]())
                    served.add(await closed_loop(calls[kind], requests[kind], level, duration / rounds, warmup, cpu))
                sweep.append({"kind": kind, "concurrency": level} | summarize(served) | compare(served, base) | {"batch_ceiling": ceiling(level)})
        peak = max(r["throughput"] for r in sweep if r["kind"] == "tensor")
        rate = rate or max(peak / 2, 0.5)
        poisson = summarize(await open_loop(calls["tensor"], requests["tensor"], rate, max(duration, 1.0), cpu))
        tail = poisson["p99_ms"] / poisson["p50_ms"] if poisson["p50_ms"] else None
        poisson |= {"kind": "tensor", "rate": round(rate, 2), "p99_over_p50": None if tail is None else round(tail, 2)}
        return {"sweep": sweep, "peak_tensor_throughput": peak, "poisson": poisson}


def batch_ceiling(by_batch: dict[int, float], concurrency: int) -> float:
    """The best ratio a server can reach when `concurrency` closed-loop clients fill its batches.

    Those clients can keep at most `concurrency` rows in a batch; the engine's speed at that batch
    size (interpolated from the batch search) over its speed at its best batch bounds the ratio.
    """
    sizes = sorted(by_batch)
    speed = float(np.interp(min(concurrency, sizes[-1]), sizes, [by_batch[b] for b in sizes]))
    return round(min(speed / max(by_batch.values()), 1.0), 3)


def compare(served: Window, base: Window) -> dict:
    """The server against its paired baseline: wall-clock throughput and images per CPU-second."""
    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    return {
        "baseline": round(base.throughput, 2),
        "baseline_per_cpu_second": round(base.per_cpu_second, 2),
        "ratio": ratio(served.throughput, base.throughput),
        "cpu_ratio": ratio(served.per_cpu_second, base.per_cpu_second),
    }


def run_benchmark(
    repository: Path,
    model: str | None = None,
    version: int | None = None,
    concurrency: Sequence[int] = (1, 4, 16, 32),
    duration: float = 10.0,
    rate: float | None = None,
    images: str | None = None,
    warmup: float | None = None,
    rounds: int = 2,
    server_args: Sequence[str] = (),
    input_kind: str = "",
) -> dict:
    """The full report as a dict (what `--json` prints).

    The best batch is found once and the server is started with it as its maximum batch size
    (unless `server_args` sets one), as perf tuning would. Each sweep point then alternates `rounds` times between a
    baseline window and a server window (each duration/rounds long) and compares their totals,
    so load from other processes that drifts during the run falls on both sides alike. Images
    per CPU-second (server plus load generator, against the baseline process) is reported beside
    wall-clock throughput: it is what the server's overhead costs, whatever else runs.
    """
    contract, folder = resolve_model(Path(repository), model, version)
    encoded = folder_images(images) if images else synthetic_images()
    tensors = np.stack([prepare(decode_image(data), contract) for data in encoded])
    window = duration / rounds
    warmup = min(1.0, window / 4) if warmup is None else warmup
    load_before = os.getloadavg()

    backend = load_backend(folder, contract)
    best, search = best_batch(backend, tensors, max(duration / 4, 0.5))
    totals = {"tensor": Window(), "image": Window()}
    measure = {
        "tensor": lambda: tensor_window(backend, tensors, best, window),
        "image": lambda: decode_window(backend, encoded, contract, best, window),
    }

    def baseline(kind: str) -> Measure:
        def run() -> Window:
            measured = measure[kind]()
            totals[kind].add(measured)
            return measured

        return run

    baselines = {kind: baseline(kind) for kind in measure}
    if not any(arg.startswith("--max-batch-size") for arg in server_args):
        server_args = [*server_args, f"--max-batch-size={best}"]  # tuned like the baseline, as an operator would
    requests = {
        "tensor": tensor_requests(tensors, contract.name, contract.version),
        "image": image_requests(encoded, contract.name, contract.version, input_kind),
    }
    with server_process(Path(repository), extra=server_args) as (address, pid):
        measured = asyncio.run(
            _measure_server(address, pid, requests, baselines, lambda level: batch_ceiling(search, level), concurrency, duration, warmup, rounds, rate)
        )
    return {
        "model": {"name": contract.name, "version": contract.version, "architecture": contract.architecture,
                  "input": list(contract.input_shape), "path": str(folder)},  # fmt: skip
        "server": {"mode": "subprocess", "args": list(server_args), "engine": backend.name, "device": backend.device,
                   "providers": getattr(backend, "providers", []), "cpus": os.cpu_count()},
        "load_average": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "images": {"count": len(encoded), "source": images or "synthetic 512x512 JPEG", "mean_bytes": int(np.mean([len(e) for e in encoded])),
                   "input_kind": input_kind or "aligned"},
        "settings": {"concurrency": list(concurrency), "duration_s": duration, "rounds": rounds, "warmup_s": warmup},
        "baseline": {
            "best_batch": best,
            "search": search,
            "tensor": round(totals["tensor"].throughput, 2),
            "image": round(totals["image"].throughput, 2),
            "tensor_per_cpu_second": round(totals["tensor"].per_cpu_second, 2),
            "image_per_cpu_second": round(totals["image"].per_cpu_second, 2),
        },
        "sweep": measured["sweep"],
        "peak_tensor_throughput": measured["peak_tensor_throughput"],
        "poisson": measured["poisson"] | {"ideal_batcher": ideal_batcher(measured["poisson"]["rate"], search, contract.batching.max_batch_size)},
        "targets": targets(measured["sweep"], measured["poisson"]),
    }


def targets(sweep: list[dict], poisson: dict) -> dict:
    """The issue's targets, judged on this run (None where the run had no concurrency >= 16)."""

    def best(kind: str, key: str) -> float | None:
        values = [r[key] for r in sweep if r["kind"] == kind and r["concurrency"] >= TARGET_CONCURRENCY and r[key] is not None]
        return max(values) if values else None

    def met(value: float | None, ok: Callable[[float], bool]) -> bool | None:
        return None if value is None else ok(value)

    found = {
        "tensor_ratio": best("tensor", "ratio"),
        "image_ratio": best("image", "ratio"),
        "tensor_cpu_ratio": best("tensor", "cpu_ratio"),
        "image_cpu_ratio": best("image", "cpu_ratio"),
        "poisson_p99_over_p50": poisson.get("p99_over_p50"),
    }
    return found | {
        "tensor_met": met(found["tensor_ratio"], lambda v: v >= TARGET_RATIO),
        "image_met": met(found["image_ratio"], lambda v: v >= TARGET_RATIO),
        "tail_met": met(found["poisson_p99_over_p50"], lambda v: v <= TARGET_TAIL),
    }


def format_report(report: dict) -> str:
    """The human-readable table."""
    model, base, server = report["model"], report["baseline"], report["server"]
    lines = [
        f"model {model['name']} v{model['version']} ({model['architecture']}, input {model['input']}); server as a "
        f"{server['mode']} {' '.join(server['args'])}; {server['cpus']} CPUs; {', '.join(server['providers'])}",
        f"load average {report['load_average']['before']} before, {report['load_average']['after']} after",
        f"baselines without a server at batch {base['best_batch']} (batch search, images/s: "
        f"{', '.join(f'{b}: {v}' for b, v in base['search'].items())}):",
        f"  tensors into ONNX Runtime   {base['tensor']:8.1f} images/s  {base['tensor_per_cpu_second']:7.2f} images/CPU-s",
        f"  decode + ONNX Runtime       {base['image']:8.1f} images/s  {base['image_per_cpu_second']:7.2f} images/CPU-s",
        "",
        f"{'requests':<9}{'conc.':>8}{'images/s':>10}{'baseline':>10}{'ratio':>7}{'ceiling':>8}{'CPU ratio':>10}"
        f"{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'errors':>7}",
    ]
    rows = [(row["kind"], row["concurrency"], row) for row in report["sweep"]]
    rows.append(("poisson", f"{report['poisson']['rate']}/s", report["poisson"]))
    for label, level, row in rows:
        lines.append(
            f"{label:<9}{level!s:>8}{row['throughput']:>10.1f}{_fmt(row.get('baseline'), '.1f'):>10}"
            f"{_fmt(row.get('ratio'), '.2f'):>7}{_fmt(row.get('batch_ceiling'), '.2f'):>8}{_fmt(row.get('cpu_ratio'), '.2f'):>10}"
            f"{_fmt(row['p50_ms'], '.1f'):>9}{_fmt(row['p90_ms'], '.1f'):>9}{_fmt(row['p99_ms'], '.1f'):>9}{row['errors']:>7}"
        )
    t = report["targets"]
    lines += [
        "",
        f"targets at concurrency >= {TARGET_CONCURRENCY}: tensor ratio {_fmt(t['tensor_ratio'], '.2f')} "
        f"(>= {TARGET_RATIO}: {_yes(t['tensor_met'])}; CPU ratio {_fmt(t['tensor_cpu_ratio'], '.2f')}), "
        f"image ratio {_fmt(t['image_ratio'], '.2f')} (>= {TARGET_RATIO}: {_yes(t['image_met'])}; "
        f"CPU ratio {_fmt(t['image_cpu_ratio'], '.2f')}); p99/p50 at half of peak "
        f"{_fmt(t['poisson_p99_over_p50'], '.2f')} (<= {TARGET_TAIL}: {_yes(t['tail_met'])}; "
        f"a perfect batcher on this engine: {_fmt(report['poisson']['ideal_batcher']['p99_over_p50'], '.2f')})",
    ]
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _yes(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")
