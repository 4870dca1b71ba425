"""`cyborg export`: a checkpoint, or a published fp32 version, → a version folder in a model repository (see docs/export.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, metavar="SOURCE",
                        help="checkpoint written by `cyborg train`, or a published fp32 version folder (models/NAME/N) "
                             "to quantise into a new version with --precision int8")
    parser.add_argument("--data", nargs="+", default=None, metavar="FOLDER",
                        help="with a version folder as SOURCE: the data folders its validation images are in (default: "
                             "the folders its model.json records)")
    parser.add_argument("--repository", type=Path, required=True, help="model repository folder (e.g. models)")
    parser.add_argument("--name", required=True, help="model name (a folder in the repository)")
    parser.add_argument("--version", type=int, required=True, help="version number (a folder under the name)")
    parser.add_argument("--threshold", default="fpr1", metavar="RULE",
                        help="the default operating point, chosen on the validation predictions: fpr1 (default: at "
                             "most 1%% of validation reals called fake), fpr5, eer, fpr:RATE, or a fixed threshold in "
                             "[0, 1] on the calibrated probability; eer, fpr1 and fpr5 are always recorded too")
    parser.add_argument("--calibrate", default="auto", metavar="METHOD",
                        help="calibrate scores on the validation predictions: platt, temperature, none, or auto "
                             "(default: the lowest cross-validated log-loss of the three)")
    parser.add_argument("--points-under", default="clean", metavar="LIST",
                        help="fit the operating points on the validation images clean and under these everyday "
                             "changes, pooled (names as `cyborg evaluate --perturb` takes them, e.g. jpeg30,blur2, or "
                             "all; clean is always included): fpr1 then calls at most 1%% of all those reals fake. "
                             "Default clean: the clean validation predictions only. The calibration stays fitted on clean")
    parser.add_argument("--device", default="auto", help="where --points-under scores the changed images: auto, cpu or cuda (default auto)")
    parser.add_argument("--precision", default="fp32", metavar="{fp32,int8}",
                        help="what model.onnx computes in: fp32 (default), or int8: the statically quantised graph "
                             "(about 2x faster on CPUs, approximate CAM), its calibration and operating points fitted "
                             "on its own validation scores")
    parser.add_argument("--int8", action="store_true", help="also write a statically quantised CPU model (model.int8.onnx) beside the fp32 one")
    parser.add_argument("--calibration-data", type=Path, default=None,
                        help="int8 calibration images: a folder or a file of paths (default: the checkpoint's validation images)")
    parser.add_argument("--calibration-images", type=int, default=64, help="how many calibration images (default: 64)")
    parser.add_argument("--int8-weight-bits", type=int, default=7, metavar="{7,8}",
                        help="int8 weights in 7 bits (default: the same scores on every CPU) or 8 (slightly closer to fp32 "
                             "on CPUs with VNNI, but saturating in the int8 kernels of x86 CPUs without it, where the "
                             "server then falls back to exact kernels at about fp32 speed)")
    parser.add_argument("--int8-stem", default="fp32", metavar="{fp32,int8}",
                        help="what each network's stem (its first convolutions, reading the image) computes in: fp32 "
                             "(default: keeps the faint pixel-level traces of generators; v9: AUC 0.988 against 0.986, "
                             "blur σ2 0.947 against 0.932, for about 6%% of int8 speed) or int8")
    parser.add_argument("--bench", action="store_true", help="with --int8 or --precision int8: print fp32 vs int8 AUC and CPU throughput")
    parser.add_argument("--tensorrt", action="store_true", help="also build an FP16 TensorRT engine (model.plan); needs TensorRT and a GPU")
    parser.add_argument("--force", action="store_true", help="replace the version if it exists (atomically)")


def run(args: argparse.Namespace) -> int:
    from training.export import ExportRequest, export_checkpoint
    from training.requantize import export_version, is_version_folder

    request = ExportRequest(
        checkpoint=args.checkpoint,
        repository=args.repository,
        name=args.name,
        version=args.version,
        int8=args.int8,
        precision=args.precision,
        tensorrt=args.tensorrt,
        force=args.force,
        calibration_data=args.calibration_data,
        calibration_images=args.calibration_images,
        int8_weight_bits=args.int8_weight_bits,
        int8_stem=args.int8_stem,
        threshold=args.threshold,
        calibrate=args.calibrate,
        bench=args.bench,
        points_under=args.points_under,
        device=args.device,
        data=args.data,
    )
    target = export_version(request) if is_version_folder(args.checkpoint) else export_checkpoint(request)
    print(target)
    return 0
