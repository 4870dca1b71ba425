"""`cyborg bench guidance`: do the guidance methods change the decision, or only the heatmap?

Builds the decoy set of `benchmarks.decoy` from a folder of real face photos, trains every method
with the same backbone, recipe and seeds on the decoy task and on the clean task, and prints for
each: decoy test AUC, the share of test decisions that follow the decoy, the CAM's mass on the
annotated regions, validation AUC on the decoy task and on the clean task, and step time relative
to CE. CE's clean test AUC is the control: the true cue is learnable at all.

Tiny backbones from scratch at 64 px by default; `--arch efficientnet_lite0 --weights imagenet`
runs a real backbone from its pretrained weights at its own input size (docs/guidance.md).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# bench name -> (guidance method, TrainConfig overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ce": ("ce", {}),
    "cyborg": ("cyborg", {}),
    "cyborg_true": ("cyborg", {"cam_class": "true"}),
    "cam_diff": ("cam_diff", {}),
    "rrr": ("rrr", {}),
    "mask": ("mask", {}),
    "consistency": ("consistency", {}),
    "mask_cyborg": ("mask_cyborg", {}),
    "swap": ("swap", {}),
    "swap_hard": ("swap", {"mask_edge": "hard"}),
    "blur": ("blur", {}),
    "mask_hard": ("mask", {"mask_edge": "hard"}),
}
DEFAULT_METHODS = "ce,cyborg,cyborg_true,cam_diff,rrr,mask,consistency"
COLUMNS = (  # (key, header)
    ("test_auc", "decoy test AUC"),
    ("follows_decoy", "follows decoy"),
    ("cam_inside", "CAM inside"),
    ("val_auc", "decoy val AUC"),
    ("clean_val_auc", "clean val AUC"),
    ("clean_gap", "clean val AUC - CE"),
    ("clean_test_auc", "clean test AUC"),
    ("step_ratio", "step time / CE"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("faces", metavar="REAL_FACES_DIR", help="folder of real, FFHQ-aligned face photos (read only)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated, from {', '.join(VARIANTS)}; each may carry TrainConfig settings of its own, "
                        f"NAME:KEY=VALUE[:KEY=VALUE], e.g. swap:freeze_bn=true (default: {DEFAULT_METHODS})")  # fmt: skip
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: 0,1,2)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run (default: 8)")
    parser.add_argument("--image-size", type=int, help="input side in pixels (default: 64 for the tiny backbones, else the architecture's)")
    parser.add_argument("--arch", default="cyborg_wide_tiny", help="backbone (default: cyborg_wide_tiny)")
    parser.add_argument("--weights", default="none", help="none (from scratch), imagenet or a PATH, as cyborg train's (default: none)")
    parser.add_argument("--faces-limit", type=int, default=300, help="use the first N photos by name (default: 300)")
    parser.add_argument("--cue-amplitude", type=float, default=8.0, help="grey levels of the true cue (default: 8)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--optimizer", default="sgd", help="sgd or adamw (default: sgd)")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default: 0.05)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a TrainConfig setting for every method, e.g. freeze_bn=true (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--no-cams", dest="cams", action="store_false", help="do not write cams.png with --out")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", metavar="DIR", help="write results.json and cams.png (CAM overlays per method) here")


def parse_list(text: str, flag: str, kind=str) -> list:
    from core.errors import UserError

    try:
        items = [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise UserError(f"{flag} {text!r}: {error}") from None
    if not items:
        raise UserError(f"{flag} is empty")
    return items


def parse_settings(items: list[str], where: str) -> dict[str, Any]:
    """KEY=VALUE strings -> TrainConfig overrides; VALUE is read as JSON (true, 0.5, "x") or else taken as text."""
    import dataclasses

    from core.errors import UserError
    from training.config import TrainConfig

    known = {field.name for field in dataclasses.fields(TrainConfig)}
    settings = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in known:
            raise UserError(f"{where} {item!r}: expected KEY=VALUE with KEY a TrainConfig setting")
        try:
            settings[key] = json.loads(text)
        except ValueError:
            settings[key] = text
    return settings


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """'swap:freeze_bn=true' -> ("swap", {"guidance": "swap", "freeze_bn": True}): the variant's settings plus its own."""
    from core.errors import UserError

    name, *items = spec.split(":")
    if name not in VARIANTS:
        raise UserError(f"--methods: unknown {name}; choose from {', '.join(VARIANTS)}")
    guidance, overrides = VARIANTS[name]
    return name, {"guidance": guidance, **overrides, **parse_settings(items, f"--methods {spec}")}


def default_size(arch: str) -> int:
    from training.model import default_image_size

    return 64 if arch.startswith("cyborg_") else default_image_size(arch)


def compare_with_ce(row: dict[str, Any], ce_row: dict[str, Any]) -> None:
    """Add the step-time ratio and the clean validation AUC's difference to CE's run on the same seed."""
    row["step_ratio"] = row["step_seconds"] / ce_row["step_seconds"]
    if row.get("clean_val_auc") is not None and ce_row.get("clean_val_auc") is not None:
        row["clean_gap"] = row["clean_val_auc"] - ce_row["clean_val_auc"]


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean and std over seeds of every column."""
    import numpy as np

    table = {}
    for key, _ in COLUMNS:
        values = [run[key] for run in runs if run.get(key) is not None]
        table[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))} if values else {"mean": None, "std": None}
    return table


def format_table(summary: dict[str, dict[str, dict[str, float | None]]], seeds: int) -> str:
    headers = ["method"] + [header for _, header in COLUMNS]
    rows = []
    for name, columns in summary.items():
        cells = [name]
        for key, _ in COLUMNS:
            mean, std = columns[key]["mean"], columns[key]["std"]
            cells.append("n/a" if mean is None else f"{mean:.3f} ± {std:.3f}")
        rows.append(cells)
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [f"| {' | '.join(cell.ljust(width) for cell, width in zip(row, widths))} |" for row in [headers, *rows]]
    lines.insert(1, f"|{'|'.join('-' * (width + 2) for width in widths)}|")
    return "\n".join(lines) + f"\n(mean ± std over {seeds} seeds)"


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from core.errors import UserError
    from benchmarks import decoy
    from training.config import TrainConfig
    from training.model import cam_grid, create_classifier

    methods = {spec: parse_method(spec)[1] for spec in parse_list(args.methods, "--methods")}
    common = parse_settings(args.settings, "--set")
    seeds = parse_list(args.seeds, "--seeds", int)
    args.image_size = args.image_size or default_size(args.arch)
    if args.epochs < 1 or args.image_size < 16 or args.batch_size < 2:
        raise UserError("--epochs must be >= 1, --image-size >= 16 and --batch-size >= 2")
    torch.set_num_threads(args.threads)
    try:
        grid = cam_grid(create_classifier(args.arch), args.image_size)
    except ValueError as error:
        raise UserError(f"--arch {args.arch}: {error}") from None
    faces = decoy.load_faces(args.faces, args.image_size, args.faces_limit)
    sets = decoy.build_decoy_set(faces, grid, decoy.DecoySpec(cue_amplitude=args.cue_amplitude))
    log.info("%d faces at %d px, CAM grid %s; %d training images per task", len(faces), args.image_size, grid, len(sets["decoy"]["train"]))

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    models = {}
    began = time.perf_counter()
    for seed in seeds:
        for name, overrides in methods.items():
            recipe = dict(arch=args.arch, weights=args.weights, optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size, seed=seed)
            config = TrainConfig(**{**recipe, **common, **overrides})
            config.validate()
            row: dict[str, Any] = {"seed": seed}
            for task in decoy.TASKS:
                trained = decoy.train_method(sets[task]["train"], config, args.epochs, seed)
                measured = decoy.measure(trained.model, sets[task]["val"], sets[task]["test"])
                if trained.diverged:
                    log.warning("seed %d %s, %s task: the loss diverged (NaN); no metrics", seed, name, task)
                if task == "decoy":
                    row.update(measured, step_seconds=trained.step_seconds)
                    if seed == seeds[0]:
                        models[name] = trained.model
                else:
                    row.update(clean_val_auc=measured["val_auc"], clean_test_auc=measured["test_auc"])
            runs[name].append(row)
            log.info("seed %d %s: %s (%.0f s so far)", seed, name, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}, time.perf_counter() - began)
    if "ce" in runs:
        for name in methods:  # per seed, against CE's on the same seed
            for row, ce_row in zip(runs[name], runs["ce"]):
                compare_with_ce(row, ce_row)
    summary = {name: summarise(rows) for name, rows in runs.items()}
    result = {
        "settings": {key: getattr(args, key) for key in ("faces", "methods", "seeds", "epochs", "image_size", "arch", "weights", "faces_limit",
                                                          "cue_amplitude", "batch_size", "optimizer", "lr", "settings")},  # fmt: skip
        "cam_grid": list(grid),
        "images": {task: {split: len(data) for split, data in splits.items()} for task, splits in sets.items()},
        "summary": summary,
        "runs": runs,
        "wall_seconds": time.perf_counter() - began,
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2))
        if args.cams:
            decoy.save_cam_overlays(models, sets["decoy"]["test"], out / "cams.png")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(summary, len(seeds)))
        if "ce" in summary:
            print(f"control (CE, no decoy): clean test AUC {summary['ce']['clean_test_auc']['mean']:.3f}")
        print(f"wall time {result['wall_seconds']:.0f} s")
    return 0
