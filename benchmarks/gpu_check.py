"""The GPU proof (`cyborg bench gpu`, `scripts/gpu_check.sh`): training, export and serving measured on a GPU in one run.

Steps, in order; each is recorded in OUT/gpu_check.json as "ok", "skipped" (with the reason) or
"failed" (with the error), and the file is rewritten after every step, so a run cut short keeps
what it measured:

- environment: torch / CUDA / GPU, ONNX Runtime's providers, whether TensorRT, cuda-python and the
  server's imports load; nothing is skipped here, it is what the later steps decide by;
- bench_train: `cyborg bench train`'s own timing (`benchmarks.commands.bench_train.bench_arch`: CE,
  CYBORG, the authors' second forward; AMP and channels_last on CUDA, as the trainer runs) for each
  --archs, with images/s and peak GPU memory;
- train: a short real `cyborg train` (the default model's recipe, --epochs) on --data, with proxy
  saliency maps from `cyborg saliency prior`; images/s per epoch from metrics.jsonl, peak GPU memory;
- export: `cyborg export` of that checkpoint (with --tensorrt where TensorRT can build here); a
  random-weights model of the same architecture when the train step left no checkpoint;
- onnxruntime_cuda: the exported model.onnx in ONNX Runtime with only the CUDA provider asked for,
  `session.get_providers()` checked, score / logits / CAM parity against the CPU provider within
  the export's fp32 tolerances, and images/s per batch for both;
- tensorrt: the plan export built, run by the server's own runner (`engines.runtime.TensorRTBackend`),
  parity within the FP16 tolerances and speed at batch 32 against ONNX Runtime CUDA;
- serve: `cyborg bench serve` (`benchmarks.serve.run_benchmark`) on the exported version, the
  server on the engine it picks by itself; the ratio to the raw engine at its best batch and p99/p50.

--dry-run runs the same code on the CPU with tiny models and settings (a few seconds), to test the
script where there is no GPU; CUDA-only steps are then recorded as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

STEPS = ("environment", "bench_train", "train", "export", "onnxruntime_cuda", "tensorrt", "serve")
RESULT_FILE = "gpu_check.json"
MODEL_NAME = "cyborg-gpu"
# The targets on the H200 (docs/benchmarks.md, "GPU check").
TARGETS = {
    "cyborg_step_vs_ce": 1.02,  # at most
    "server_vs_raw_engine": 0.9,  # at least, at the engine's best batch
    "p99_over_p50_half_peak": 2.0,  # at most
    "tensorrt_vs_onnxruntime_cuda_batch32": 3.0,  # at least
}
# The default model's recipe (scripts/default_model.py) for the short training run.
RECIPE = ["--augment", "everyday", "--augment-p", "0.1", "--optimizer", "adamw", "--lr", "0.0005",
          "--weight-decay", "0.05", "--schedule", "cosine", "--guidance", "cyborg", "--alpha", "0.5"]  # fmt: skip


@dataclasses.dataclass
class Settings:
    out: Path
    work: Path
    dry_run: bool = False
    data: Path | None = None
    archs: tuple[str, ...] = ("resnet50", "densenet121")
    bench_batch: int = 64
    bench_image_size: int | None = None  # the architecture's
    bench_steps: int = 20
    bench_warmup: int = 3
    train_arch: str = "efficientnet_lite0"
    train_image_size: int = 224
    train_scale: int = 256
    train_epochs: int = 2
    train_batch: int = 64
    train_weights: str = "none"  # nothing can be downloaded on the device machine
    workers: int = 8
    speed_batches: tuple[int, ...] = (1, 8, 32, 64)
    speed_seconds: float = 2.0
    serve_concurrency: tuple[int, ...] = (1, 4, 16, 32, 64)
    serve_duration: float = 4.0
    serve_rounds: int = 2
    serve_on_cpu: bool = False
    budget_s: float = 450.0
    skip: tuple[str, ...] = ()

    @classmethod
    def dry(cls, out: Path, work: Path, **overrides: Any) -> Settings:
        """Tiny models and windows: the whole script in seconds on a CPU."""
        tiny = dict(dry_run=True, archs=("cyborg_local_tiny",), bench_batch=4, bench_image_size=32, bench_steps=2, bench_warmup=1,
                    train_arch="cyborg_local_tiny", train_image_size=32, train_scale=32, train_epochs=1, train_batch=8, workers=0,
                    speed_batches=(1, 4), speed_seconds=0.1, serve_concurrency=(1, 2), serve_duration=0.4, serve_rounds=1)  # fmt: skip
        return cls(out=out, work=work, **(tiny | overrides))


class Skipped(Exception):
    """A step that cannot run here; the message says why."""


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def cuda_ready() -> bool:
    import torch

    return torch.cuda.is_available()


def require_cuda(what: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise Skipped(f"{what}: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)")


@contextlib.contextmanager
def peak_memory(figures: dict[str, Any]):
    """Peak GPU memory of the block (torch's allocator) into figures, where CUDA is in use."""
    import torch

    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    yield
    torch.cuda.synchronize()
    figures["peak_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    figures["peak_memory_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)


COMMAND_MODULES = {"saliency prior": "training.commands.saliency_prior", "train": "training.commands.train", "export": "training.commands.export"}


def cyborg(command: str, *argv: str) -> int:
    """`cyborg COMMAND ARGV...` in this process, through the command's own module (as cyborg.cli runs it);
    its errors propagate (UserError with its message)."""
    import importlib

    module = importlib.import_module(COMMAND_MODULES[command])
    parser = argparse.ArgumentParser(prog=f"cyborg {command}")
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(list(argv))) or 0)


# ---------------------------------------------------------------------------------------------
# The steps


def environment(settings: Settings) -> dict[str, Any]:
    import torch

    from engines.runtime import cuda_device_count, tensorrt_available

    found: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices_driver": cuda_device_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), compute_capability=f"{props.major}.{props.minor}",
                     multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version())  # fmt: skip
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        with contextlib.suppress(Exception):
            found["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    try:
        import onnxruntime as ort

        found.update(onnxruntime=ort.__version__, onnxruntime_providers=ort.get_available_providers())
    except ImportError as error:
        found["onnxruntime"] = f"does not import: {error}"
    try:
        import tensorrt

        found["tensorrt"] = tensorrt.__version__
    except ImportError as error:
        found["tensorrt"] = f"does not import: {error}"
    found["tensorrt_runner_ready"] = tensorrt_available()  # tensorrt and cuda-python (engines.runtime.TensorRTBackend)
    try:
        import serving.server  # noqa: F401  (grpcio, grpc_health, protobuf version of the generated code)

        found["server_imports"] = "ok"
    except Exception as error:  # noqa: BLE001 - any import failure is a finding
        found["server_imports"] = f"fail: {type(error).__name__}: {error}"
    with contextlib.suppress(Exception):
        found["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    return found


def bench_train(settings: Settings) -> dict[str, Any]:
    """`cyborg bench train`'s timing per architecture, plus images/s and peak GPU memory."""
    import torch

    from benchmarks.commands.bench_train import WAYS, add_arguments, bench_arch
    from training.config import TrainConfig
    from training.distributed import resolve_device

    if not settings.dry_run:
        require_cuda("bench train --device cuda")
    device_name = "cpu" if settings.dry_run else "cuda"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--archs", ",".join(settings.archs), "--batch-size", str(settings.bench_batch), "--steps", str(settings.bench_steps),
            "--warmup", str(settings.bench_warmup), "--device", device_name]  # fmt: skip
    if settings.bench_image_size:
        argv += ["--image-size", str(settings.bench_image_size)]
    args = parser.parse_args(argv)
    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    config = TrainConfig()
    rows = []
    for arch in settings.archs:
        row: dict[str, Any] = {}
        with peak_memory(row):
            row.update(bench_arch(arch, args, device))
        row["images_per_s"] = {way: round(settings.bench_batch / row[f"{way}_s"], 1) for way in WAYS}
        rows.append(row)
        if cuda:
            torch.cuda.empty_cache()
    return {
        "command": "cyborg bench train " + " ".join(argv),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "amp": cuda and config.amp,
        "channels_last": cuda and config.channels_last,
        "batch_size": settings.bench_batch,
        "steps": settings.bench_steps,
        "results": rows,
    }


def find_data(settings: Settings) -> Path | None:
    """--data, else the shared faces where a checkout keeps them (docs/benchmarks.md, "GPU check")."""
    if settings.data is not None:
        if not Path(settings.data).is_dir():
            raise Skipped(f"--data {settings.data}: not a folder")
        return Path(settings.data)
    if settings.dry_run:
        return None  # a dry run trains on a tiny synthetic set unless --data is given
    for candidate in ("shared/data/faces", "../shared/data/faces", ".gpudata/faces"):
        if (Path(candidate) / "real").is_dir():
            return Path(candidate)
    return None


def synthetic_faces(folder: Path, per_class: int = 24, size: int = 48, seed: int = 0) -> Path:
    """A tiny plain-layout data set (real/, fake/): noise with a dark (real) or bright (fake) lower-right quarter."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(("real", "fake")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.normal(128.0, 20.0, (size, size, 3))
            pixels[size // 2 :, size // 2 :] = 200.0 if label else 55.0
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name / f"{name}-{i:03d}.png")
    return folder


def train(settings: Settings, state: dict[str, Any]) -> dict[str, Any]:
    """A short real `cyborg train` run; its checkpoint feeds the export step."""
    data = find_data(settings)
    source = str(data) if data else None
    if data is None:
        if not settings.dry_run:
            raise Skipped("no face data: pass --data FOLDER (plain layout, real/ and fake/) or carry the shared faces as "
                          ".gpudata/faces (docs/benchmarks.md, 'GPU check')")  # fmt: skip
        data, source = synthetic_faces(settings.work / "data"), "synthetic (dry run)"
    if not settings.dry_run:
        require_cuda("cyborg train --device cuda")
    state["data"] = data
    maps, run_dir = settings.work / "maps", settings.work / "train"
    figures: dict[str, Any] = {"data": source}
    began = time.perf_counter()
    cyborg("saliency prior", str(data), "--out", str(maps))
    figures["saliency_prior_s"] = round(time.perf_counter() - began, 2)
    argv = [str(data), "--heatmaps", str(maps), "--arch", settings.train_arch, "--weights", settings.train_weights,
            "--image-size", str(settings.train_image_size), "--scale", str(settings.train_scale), *RECIPE,
            "--epochs", str(settings.train_epochs), "--batch-size", str(settings.train_batch), "--workers", str(settings.workers),
            "--device", "cpu" if settings.dry_run else "cuda", "--out", str(run_dir), "--no-progress"]  # fmt: skip
    figures["command"] = "cyborg train " + " ".join(argv)
    began = time.perf_counter()
    with peak_memory(figures):
        cyborg("train", *argv)
    figures["wall_s"] = round(time.perf_counter() - began, 2)
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    figures["epochs"] = [{key: row.get(key) for key in ("epoch", "train_images_per_s", "train_loss", "val_auc", "saliency")} for row in epochs]
    figures["images_per_s_last_epoch"] = round(epochs[-1]["train_images_per_s"], 1)  # the first includes cuDNN's warm-up
    if (run_dir / "best.pt").is_file():
        state["checkpoint"] = run_dir / "best.pt"
    return figures


def tensorrt_usable() -> str | None:
    """None when TensorRT can build and run engines here, else why not."""
    from core.errors import UserError
    from training.tensorrt import require_tensorrt

    try:
        require_tensorrt()
    except UserError as error:
        return str(error).removeprefix("--tensorrt: ")
    return None


def export(settings: Settings, state: dict[str, Any]) -> dict[str, Any]:
    """`cyborg export` of the train step's checkpoint (with --tensorrt where it can run)."""
    from core import contract as c

    repository = settings.work / "repository"
    figures: dict[str, Any] = {}
    checkpoint = state.get("checkpoint")
    if checkpoint is None:
        from benchmarks.bench_model import write_model

        figures["source"] = "random weights (the train step left no checkpoint)"
        size = settings.train_image_size if settings.dry_run else None
        folder = write_model(repository, settings.train_arch, MODEL_NAME, 1, image_size=size)
    else:
        figures["source"] = str(checkpoint)
        argv = [str(checkpoint), "--repository", str(repository), "--name", MODEL_NAME, "--version", "1", "--force"]
        why_not = tensorrt_usable()
        figures["tensorrt_in_export"] = why_not or "yes"
        began = time.perf_counter()
        if why_not is None:
            try:
                cyborg("export", *argv, "--tensorrt")
            except Exception as error:  # noqa: BLE001 - recorded; the fp32 export still serves the later steps
                figures["tensorrt_in_export"] = f"failed: {type(error).__name__}: {error}"
                cyborg("export", *argv)
        else:
            cyborg("export", *argv)
        figures["export_s"] = round(time.perf_counter() - began, 2)
        folder = repository / MODEL_NAME / "1"
    contract = c.read_contract(folder, verify=True)
    state.update(repository=repository, folder=folder, contract=contract)
    metrics = contract.metrics or {}
    figures.update(folder=str(folder), files=sorted(contract.files), architecture=contract.architecture,
                   input=list(contract.input_shape), export=metrics.get("export"), tensorrt=metrics.get("tensorrt"))  # fmt: skip
    return figures


class ProviderSession:
    """model.onnx in ONNX Runtime with exactly `providers` asked for (the server's session options)."""

    def __init__(self, path: Path, providers: Sequence[str]):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.providers = self.session.get_providers()
        self.name, self.device = "onnxruntime", "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        from core.contract import INPUT_NAME, OUTPUT_NAMES

        return dict(zip(OUTPUT_NAMES, self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})))


def check_images(state: dict[str, Any], count: int = 32) -> np.ndarray:
    """uint8 [count, 3, H, W]: up to 16 images of the data, the rest random, as the model sees them."""
    from core.images import image_files, load_images, spread

    contract = state["contract"]
    height, width = contract.input_height, contract.input_width
    faces = np.zeros((0, 3, height, width), np.uint8)
    if state.get("data") is not None:
        faces = load_images(spread(image_files(Path(state["data"])), 16), height, width, contract.scale)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (count - len(faces), 3, height, width), dtype=np.uint8)
    return np.concatenate([faces, noise])


def speeds(backend, images: np.ndarray, batches: Sequence[int], seconds: float) -> dict[int, float]:
    """images/s at each batch size (benchmarks.serve's timed loop: one warm-up run, then `seconds`)."""
    from benchmarks.serve import tensor_window

    return {batch: round(tensor_window(backend, images, batch, seconds).throughput, 1) for batch in batches}


def within(diffs: dict[str, float], tolerances: dict[str, float]) -> bool:
    return all(diffs[name] <= limit for name, limit in tolerances.items())


def onnxruntime_cuda(settings: Settings, state: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime's CUDA provider on the exported graph: really used, parity with the CPU provider, speed."""
    import onnxruntime as ort

    from core.contract import ONNX_FILE
    from engines.runtime import cuda_device_count
    from training.onnx_export import TOLERANCES, compare

    if "folder" not in state:
        raise Skipped("the export step wrote no model")
    path = state["folder"] / ONNX_FILE
    images = check_images(state)
    available = ort.get_available_providers()
    reason = None
    if "CUDAExecutionProvider" not in available:
        reason = (f"onnxruntime {ort.__version__} offers {available}: no CUDAExecutionProvider (the CPU build; "
                  "onnxruntime-gpu is needed, and its wheel is too large to carry to the device machine)")  # fmt: skip
    elif cuda_device_count() == 0:
        reason = f"onnxruntime {ort.__version__} has CUDAExecutionProvider but the CUDA driver reports no device"
    cpu = ProviderSession(path, ["CPUExecutionProvider"])
    reference = cpu.run(images)
    if reason is not None:
        if settings.dry_run:  # exercise the comparison and timing code on the CPU provider alone
            state["exercise"] = {"providers": cpu.providers, "parity_vs_cpu": compare(reference, cpu.run(images)),
                                 "images_per_s": speeds(cpu, images, settings.speed_batches, settings.speed_seconds)}  # fmt: skip
        raise Skipped(reason)
    session = ProviderSession(path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    figures: dict[str, Any] = {"providers_asked": ["CUDAExecutionProvider", "CPUExecutionProvider"], "providers_used": session.providers}
    if session.providers[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"ONNX Runtime fell back to {session.providers} (CUDA or cuDNN libraries missing?)")
    from engines.runtime import OnnxRuntimeBackend

    figures["server_backend_providers"] = OnnxRuntimeBackend(path, device="cuda").providers  # what `cyborg serve --device cuda` gets
    diffs = compare(reference, session.run(images))
    figures.update(parity_vs_cpu=diffs, tolerances=TOLERANCES, parity_ok=within(diffs, TOLERANCES), parity_images=len(images))
    figures["images_per_s"] = {"cuda": speeds(session, images, settings.speed_batches, settings.speed_seconds),
                               "cpu": speeds(cpu, images, settings.speed_batches, settings.speed_seconds)}  # fmt: skip
    state["ort_cuda"] = session
    state["ort_cuda_speed"] = figures["images_per_s"]["cuda"]
    return figures


def tensorrt(settings: Settings, state: dict[str, Any]) -> dict[str, Any]:
    """The FP16 plan export built, run as the server runs it: parity and speed against ONNX Runtime CUDA."""
    from core.contract import ONNX_FILE, TENSORRT_FILE
    from engines.runtime import TensorRTBackend
    from training.onnx_export import compare
    from training.tensorrt import FP16_TOLERANCES

    if settings.dry_run:
        raise Skipped("dry run: TensorRT builds and runs engines on a GPU only")
    why_not = tensorrt_usable()
    if why_not is not None:
        raise Skipped(why_not)
    if "folder" not in state:
        raise Skipped("the export step wrote no model")
    plan = state["folder"] / TENSORRT_FILE
    if not plan.is_file():
        raise RuntimeError(f"export left no {TENSORRT_FILE} although TensorRT imports (see the export step)")
    engine = TensorRTBackend(plan, state["contract"])
    images = check_images(state)
    reference_engine = state.get("ort_cuda") or ProviderSession(state["folder"] / ONNX_FILE, ["CPUExecutionProvider"])
    diffs = compare(reference_engine.run(images), {k: v.astype(np.float32) for k, v in engine.run(images).items()})
    figures: dict[str, Any] = {"plan_bytes": plan.stat().st_size, "max_batch": int(engine.max_batch), "reference": reference_engine.providers[0],
                               "parity": diffs, "tolerances": FP16_TOLERANCES, "parity_ok": within(diffs, FP16_TOLERANCES)}  # fmt: skip
    batches = [b for b in settings.speed_batches if b <= engine.max_batch]
    figures["images_per_s"] = speeds(engine, images, batches, settings.speed_seconds)
    ort_speed = state.get("ort_cuda_speed") or {}
    if 32 in figures["images_per_s"] and ort_speed.get(32):
        figures["speedup_vs_onnxruntime_cuda_batch32"] = round(figures["images_per_s"][32] / ort_speed[32], 2)
    return figures


def serve(settings: Settings, state: dict[str, Any]) -> dict[str, Any]:
    """`cyborg bench serve` on the exported version, the server on the engine it picks itself."""
    from benchmarks.serve import load_backend, run_benchmark

    if "folder" not in state:
        raise Skipped("the export step wrote no model")
    server_error = None
    try:
        import serving.server  # noqa: F401
    except Exception as error:  # noqa: BLE001
        server_error = f"{type(error).__name__}: {error}"
    if server_error:
        raise Skipped(f"the server does not import here ({server_error}); carry the serving wheels (docs/benchmarks.md, 'GPU check')")
    engine = load_backend(state["folder"], state["contract"])  # what the server will pick
    on_gpu = engine.device == "cuda"
    del engine
    if not on_gpu and not settings.dry_run and not settings.serve_on_cpu:
        raise Skipped("the server would run on the CPU: no CUDA provider in onnxruntime and no TensorRT plan that can run here "
                      "(--serve-on-cpu measures it anyway)")  # fmt: skip
    report = run_benchmark(state["repository"], model=MODEL_NAME, version=1, concurrency=settings.serve_concurrency,
                           duration=settings.serve_duration, rounds=settings.serve_rounds)  # fmt: skip
    baseline = report["baseline"]["tensor"]
    return {
        "engine_on_gpu": on_gpu,
        "server_vs_raw_engine": round(report["peak_tensor_throughput"] / baseline, 3) if baseline else None,
        "p99_over_p50_half_peak": report["poisson"].get("p99_over_p50"),
        "report": report,
    }


# ---------------------------------------------------------------------------------------------
# The run


def judge(value: float | None, target: float, at_least: bool) -> bool | None:
    if value is None:
        return None
    return value >= target if at_least else value <= target


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, judged on this run's figures (None where the step did not run)."""
    steps = report["steps"]
    gpu = not report["dry_run"]
    found: dict[str, Any] = {}
    bench = steps.get("bench_train", {})
    for row in bench.get("results", []):
        value = round(row["cyborg_vs_ce"], 3)
        found[f"cyborg_step_vs_ce:{row['arch']}"] = {"value": value, "target": f"<= {TARGETS['cyborg_step_vs_ce']}",
                                                     "met": judge(value, TARGETS["cyborg_step_vs_ce"], False), "on_gpu": gpu}  # fmt: skip
    served = steps.get("serve", {})
    on_gpu = gpu and served.get("engine_on_gpu", False)
    for key, at_least in (("server_vs_raw_engine", True), ("p99_over_p50_half_peak", False)):
        value = served.get(key)
        found[key] = {"value": value, "target": f"{'>=' if at_least else '<='} {TARGETS[key]}", "met": judge(value, TARGETS[key], at_least), "on_gpu": on_gpu}
    rt = steps.get("tensorrt", {})
    value = rt.get("speedup_vs_onnxruntime_cuda_batch32")
    found["tensorrt_vs_onnxruntime_cuda_batch32"] = {"value": value, "target": f">= {TARGETS['tensorrt_vs_onnxruntime_cuda_batch32']}",
                                                     "met": judge(value, TARGETS["tensorrt_vs_onnxruntime_cuda_batch32"], True), "on_gpu": gpu}  # fmt: skip
    for step in ("onnxruntime_cuda", "tensorrt"):
        found[f"parity:{step}"] = {"value": steps.get(step, {}).get("parity_vs_cpu" if step == "onnxruntime_cuda" else "parity"),
                                   "target": "within the contract's tolerances", "met": steps.get(step, {}).get("parity_ok"), "on_gpu": gpu}  # fmt: skip
    return found


class GpuCheck:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.began = time.perf_counter()
        self.state: dict[str, Any] = {}
        self.report: dict[str, Any] = {
            "tool": "cyborg bench gpu",
            "dry_run": settings.dry_run,
            "started": utc_now(),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()},
            "steps": {},
        }

    def write(self) -> Path:
        self.report["wall_s"] = round(time.perf_counter() - self.began, 1)
        self.report["targets"] = targets(self.report)
        steps = self.report["steps"]
        self.report["summary"] = {status: {name: step.get("reason") or step.get("error") for name, step in steps.items() if step["status"] == status}
                                  for status in ("ok", "skipped", "failed")}  # fmt: skip
        self.settings.out.mkdir(parents=True, exist_ok=True)
        path = self.settings.out / RESULT_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        temporary.replace(path)
        return path

    def step(self, name: str, function: Callable[[], dict[str, Any]]) -> None:
        elapsed = time.perf_counter() - self.began
        record: dict[str, Any]
        if name in self.settings.skip:
            record = {"status": "skipped", "reason": "--skip"}
        elif elapsed > self.settings.budget_s:
            record = {"status": "skipped", "reason": f"time budget: {elapsed:.0f} s spent of --budget {self.settings.budget_s:.0f} s"}
        else:
            log.info("gpu check: %s (%.0f s so far)", name, elapsed)
            began = time.perf_counter()
            try:
                record = {"status": "ok", **function()}
            except Skipped as why:
                record = {"status": "skipped", "reason": str(why)}
                if "exercise" in self.state:
                    record["dry_run_exercise"] = self.state.pop("exercise")
            except Exception as error:  # noqa: BLE001 - one broken step must not hide the others' figures
                record = {"status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
                log.error("gpu check: %s failed: %s", name, record["error"])
            record["seconds"] = round(time.perf_counter() - began, 2)
        self.report["steps"][name] = record
        self.write()

    def run(self) -> dict[str, Any]:
        s, state = self.settings, self.state
        s.work.mkdir(parents=True, exist_ok=True)
        self.step("environment", lambda: environment(s))
        self.report["environment"] = self.report["steps"]["environment"]
        self.step("bench_train", lambda: bench_train(s))
        self.step("train", lambda: train(s, state))
        self.step("export", lambda: export(s, state))
        self.step("onnxruntime_cuda", lambda: onnxruntime_cuda(s, state))
        self.step("tensorrt", lambda: tensorrt(s, state))
        self.step("serve", lambda: serve(s, state))
        self.report["finished"] = utc_now()
        self.write()
        return self.report


def format_summary(report: dict[str, Any]) -> str:
    lines = [f"gpu check ({'dry run, CPU' if report['dry_run'] else 'GPU'}), {report['wall_s']} s; "
             f"device: {report['steps']['environment'].get('gpu', 'none')}"]  # fmt: skip
    for name, step in report["steps"].items():
        detail = step.get("reason") or step.get("error") or ""
        lines.append(f"  {name:<18}{step['status']:<9}{step.get('seconds', 0):>7.1f} s  {detail}".rstrip())
    lines.append("targets:")
    for name, target in report["targets"].items():
        met = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        value = target["value"] if not isinstance(target["value"], dict) else ", ".join(f"{k} {v:.2g}" for k, v in target["value"].items())
        lines.append(f"  {name:<40}{value!s:>12}  ({target['target']}): {met}{'' if target['on_gpu'] else ' [not a GPU figure]'}")
    return "\n".join(lines)


def default_work() -> Path:
    return Path(tempfile.mkdtemp(prefix="cyborg-gpu-check-"))
