"""CPU INT8: static QDQ quantisation of the exported graph, with its accuracy and speed measured.

Calibration images come from the checkpoint's validation split (or --calibration-data) and go
through core.images exactly as in training. Weights use 7 bits by default (`--int8-weight-bits`):
8-bit weights saturate in the int8 kernels of x86 CPUs without VNNI (`engines.cpu`), so a graph
measured on one CPU would score differently on another; with 7 bits it scores the same everywhere. The CAM head (everything after the backbone's
last feature map) stays in fp32 so the explanation keeps as much of its accuracy as the features
allow; the measured differences are written to model.json. Each network's stem (the convolutions
that read the normalised image, before any other convolution) stays in fp32 by default
(`--int8-stem`): quantising their input re-rounds the pixels onto a uint8 grid that does not line
up with the image's own, which blurs away the faint high-frequency traces generators leave (v9:
validation AUC 0.9856 with int8 stems, 0.9880 with fp32 ones, blur σ2 0.932 against 0.947, for
about 6 % of int8 speed; docs/benchmarks.md).

Two uses: `--int8` writes model.int8.onnx beside the fp32 model.onnx (a side file for the
user's own runtime); `--precision int8` makes the int8 graph the version's model.onnx, the one
every server runs, with its calibration and operating points fitted on its own validation scores
(`quantize_as_model`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from core import contract as c
from core.errors import UserError
from core.images import image_files, load_images, load_labelled_images, read_image, spread, to_model_input
from engines.cpu import SATURATION_FREE_WEIGHT_BITS, exact_int8_entries, int8_kernels
from training.checkpoint import Checkpoint

log = logging.getLogger(__name__)

EVALUATION_IMAGES = 512  # validation images scored by both graphs at export time
BENCH_BATCH = 32
BENCH_ROUNDS = 3
# Ops that ORT's CPU kernels run faster in int8; the CAM head (Einsum/MatMul, min-max) stays fp32.
QUANTIZED_OPS = ["Conv", "Gemm", "Add", "Mul", "Relu", "Clip", "GlobalAveragePool", "AveragePool", "MaxPool", "Concat"]
STEM_PRECISIONS = ("fp32", "int8")  # --int8-stem: what each network's first convolutions compute in


class ImageReader:
    """onnxruntime.quantization's CalibrationDataReader over a uint8 image array, in small batches."""

    def __init__(self, images: np.ndarray, batch: int = 8):
        self.batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {c.INPUT_NAME: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


def stem_convolutions(graph) -> list[str]:
    """Names of the Conv nodes of an ONNX graph with no Conv upstream of them: each network's first
    convolutions (one per member of an ensemble)."""
    after_conv: set[str] = set()  # tensors computed from some convolution's output
    stems = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        upstream = any(name in after_conv for name in node.input)
        if node.op_type == "Conv" and not upstream:
            stems.append(node.name)
        if upstream or node.op_type == "Conv":
            after_conv.update(node.output)
    return stems


def quantize(onnx_path: Path, output_path: Path, calibration: np.ndarray, weight_bits: int = 7, stem: str = "fp32") -> list[str]:
    """Write a per-channel, QDQ, statically quantised copy of `onnx_path` to `output_path`, its weights
    in `weight_bits` bits (7: [-64, 63], exact on every CPU; 8: [-127, 127], see `engines.cpu`) and its
    stem convolutions in `stem` precision; return the names of the convolutions left in fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    CalibrationDataReader.register(ImageReader)
    with tempfile.TemporaryDirectory(dir=output_path.parent, prefix=".quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        try:  # shape inference + graph fusions make more of the graph quantisable
            quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        except Exception as error:  # the pre-pass is an optimisation: quantise the plain graph instead
            log.warning("quant_pre_process failed (%s); quantising the graph as exported", error)
            prepared = onnx_path
        kept = stem_convolutions(onnx.load(str(prepared)).graph) if stem == "fp32" else []
        quantize_static(
            str(prepared),
            str(output_path),
            ImageReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=weight_bits == SATURATION_FREE_WEIGHT_BITS,  # ONNX Runtime's 7-bit weights
            op_types_to_quantize=QUANTIZED_OPS,
            nodes_to_exclude=kept,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    return kept


def calibration_images(request, state: Checkpoint, size: int) -> np.ndarray:
    if request.calibration_data is not None:
        paths = image_files(Path(request.calibration_data))
        where = f"--calibration-data {request.calibration_data}"
    else:
        paths, _ = state.val_predictions.existing_images()
        where = "the checkpoint's val_predictions paths"
    images = load_images(spread(paths, request.calibration_images), size, size, state.input_scale)
    if len(images) == 0:
        raise UserError(f"--int8: no readable calibration images in {where}; pass --calibration-data FOLDER")
    return images


def int8_session(path: Path, weight_bits: int):
    """An ONNX Runtime CPU session for an int8 graph, run as the server runs it (`engines.cpu`: exact
    kernels for 8-bit weights on a CPU that would saturate them)."""
    from training.onnx_export import ort_session

    return ort_session(path, config_entries=exact_int8_entries(weight_bits))


def score_all(session, images: np.ndarray, batch: int = BENCH_BATCH) -> dict[str, np.ndarray]:
    from training.onnx_export import run_onnx

    parts = [run_onnx(session, images[i : i + batch]) for i in range(0, len(images), batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in c.OUTPUT_NAMES}


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else None


def throughput(session, images: np.ndarray, seconds: float) -> float:
    """Images per second over repeated runs of one batch for about `seconds`."""
    from training.onnx_export import run_onnx

    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        run_onnx(session, images)
        done += len(images)
    return done / (time.perf_counter() - start)


def evaluate_int8(fp32_path: Path, int8_path: Path, images: np.ndarray, labels: np.ndarray, weight_bits: int) -> dict[str, Any]:
    """AUC of both graphs and their output differences on labelled validation images."""
    from training.onnx_export import compare, ort_session

    fp32, int8 = score_all(ort_session(fp32_path), images), score_all(int8_session(int8_path, weight_bits), images)
    diffs = compare(fp32, int8)
    cam_mean = float(np.abs(fp32[c.CAM_OUTPUT] - int8[c.CAM_OUTPUT]).mean())
    result: dict[str, Any] = {
        "evaluation_images": int(len(images)),
        "max_abs_diff_vs_fp32": {k: diffs[k] for k in c.OUTPUT_NAMES},
        "mean_abs_cam_diff_vs_fp32": cam_mean,
        "decision_agreement": diffs["class_agreement"],
    }
    known = labels >= 0
    fp32_auc, int8_auc = auc(labels[known], fp32[c.SCORE_OUTPUT][known]), auc(labels[known], int8[c.SCORE_OUTPUT][known])
    if fp32_auc is not None:
        result.update(fp32_auc=fp32_auc, int8_auc=int8_auc, auc_change=int8_auc - fp32_auc)
    result["cam_note"] = (
        "the int8 CAM meets the fp32 contract's 5e-4 tolerance"
        if diffs[c.CAM_OUTPUT] <= 5e-4
        else f"the int8 CAM is approximate (max {diffs[c.CAM_OUTPUT]:.3f}, mean {cam_mean:.4f} from fp32): "
        "use an fp32 model where exact explanations matter"
    )
    return result


def benchmark(fp32_path: Path, int8_path: Path, images: np.ndarray, weight_bits: int, batch: int = BENCH_BATCH,
              rounds: int = BENCH_ROUNDS, seconds: float = 3.0) -> dict[str, Any]:
    """fp32 and int8 throughput at one batch size, all cores: rounds alternate, the best of each counts
    (other jobs on a shared CPU only ever slow a round down)."""
    from training.onnx_export import ort_session, run_onnx

    batch_images = np.resize(images, (batch, *images.shape[1:]))
    sessions = {"fp32": ort_session(fp32_path), "int8": int8_session(int8_path, weight_bits)}
    best = dict.fromkeys(sessions, 0.0)
    for session in sessions.values():
        run_onnx(session, batch_images)  # warm-up
    for _ in range(rounds):
        for kind, session in sessions.items():
            best[kind] = max(best[kind], throughput(session, batch_images, seconds))
    return {"batch": batch, "threads": os.cpu_count(), "rounds": rounds, "fp32_images_per_s": best["fp32"],
            "int8_images_per_s": best["int8"], "speedup": best["int8"] / best["fp32"]}


def quantize_checkpoint_model(request, state: Checkpoint, folder: Path, size: int, with_bench: bool = False) -> dict[str, Any]:
    """Write folder/model.int8.onnx next to model.onnx; return the figures for model.json."""
    images = calibration_images(request, state, size)
    fp32_path, int8_path = folder / c.ONNX_FILE, folder / c.INT8_ONNX_FILE
    bits = request.int8_weight_bits
    kept = quantize(fp32_path, int8_path, images, bits, request.int8_stem)
    eval_images, eval_labels = load_labelled_images(*state.val_predictions.existing_images(EVALUATION_IMAGES), size, size, state.input_scale)
    if len(eval_images) == 0:
        eval_images, eval_labels = images, np.full(len(images), -1)
    result = {"file": c.INT8_ONNX_FILE, "calibration_images": int(len(images)), "weight_bits": bits, "stem": request.int8_stem,
              "fp32_convolutions": kept,
              "quantisation": f"static QDQ, per-channel int8 weights in {bits} bits, uint8 activations, MinMax calibration; "
              f"stem convolutions in {request.int8_stem}, CAM head kept in fp32", "measured_on": int8_kernels()}  # fmt: skip
    result.update(evaluate_int8(fp32_path, int8_path, eval_images, eval_labels, bits))
    if with_bench:
        result["bench"] = benchmark(fp32_path, int8_path, eval_images, bits)
        print_figures(result, result["bench"])
    return result


def graph_scores_under(path: Path, samples: list, changes: list, size: int, scale: int, weight_bits: int,
                       batch: int = BENCH_BATCH) -> dict[str, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """{change name: (labels, scores)} of the int8 graph at `path` on `samples` (`training.data.Sample`s)
    under each of `changes` (`training.perturb`), each image decoded, changed and prepared as
    `cyborg evaluate --perturb` does, in the samples' order."""
    session, labels = int8_session(path, weight_bits), np.asarray([sample.label for sample in samples], dtype=np.int64)
    originals = [read_image(sample.path) for sample in samples]
    found = {}
    for change in changes:
        log.info("scoring %s under %s", path.name, change.name)
        images = np.stack([to_model_input(change(image), size, size, scale) for image in originals])
        found[change.name] = (labels, score_all(session, images, batch)[c.SCORE_OUTPUT].astype(np.float64))
    return found


def quantize_as_model(request, state: Checkpoint, folder: Path, size: int) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """`--precision int8`: quantise folder/model.onnx and put the int8 graph in its place; return
    (model.json's metrics["int8"], the int8 graph's validation scores under `request.changes`, "clean"
    first: what its calibration and operating points are fitted on)."""
    samples = state.val_predictions.samples("--precision int8 fits the calibration and operating points on the int8 "
                                            "graph's own scores of the checkpoint's validation images")  # fmt: skip
    figures = quantize_checkpoint_model(request, state, folder, size, with_bench=request.bench)
    fp32_path, int8_path = folder / c.ONNX_FILE, folder / c.INT8_ONNX_FILE
    under = graph_scores_under(int8_path, samples, request.changes, size, state.input_scale, request.int8_weight_bits)
    figures.update(file=c.ONNX_FILE, fp32_sha256=c.sha256_file(fp32_path))
    os.replace(int8_path, fp32_path)
    return figures, under


def print_figures(result: dict[str, Any], figures: dict[str, Any]) -> None:
    print(f"int8 vs fp32 on {result['evaluation_images']} validation images:")
    if "fp32_auc" in result:
        print(f"  AUC fp32 {result['fp32_auc']:.4f}  int8 {result['int8_auc']:.4f}  change {result['auc_change']:+.4f}")
    print(f"  decisions agree {result['decision_agreement']:.3f}; CAM max diff {result['max_abs_diff_vs_fp32'][c.CAM_OUTPUT]:.4f}, "
          f"mean {result['mean_abs_cam_diff_vs_fp32']:.4f}")
    print(f"  throughput batch {figures['batch']}, {figures['threads']} threads: fp32 {figures['fp32_images_per_s']:.1f} "
          f"images/s, int8 {figures['int8_images_per_s']:.1f} images/s, speed-up {figures['speedup']:.2f}x")
