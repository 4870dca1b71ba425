"""Retrain and re-export the embedded default model from scratch, with the project's own commands.

    python scripts/default_model.py --data ../shared/data --seed 0   (what `make default-model` runs)

Steps: the sources that are not FFHQ-aligned (Stable Diffusion faces, studio portraits) are turned
into aligned face crops with `cyborg data align` (what the server does to a photo, so training and
serving see faces the same way), split as the seed-0 hold-out of the original folders splits them
(a face's validation image is never another version's training image); proxy saliency maps for the
FFHQ-aligned faces (`cyborg saliency prior`; the aligned crops of other sources train with CE
only); one CYBORG run per member seed (`--members`, default one run, seed 1) on every source at
once (`cyborg train DATA...`) on the whole 256-px face, several members averaged into one model
(`cyborg ensemble`; seeds 0 and 1: v7); then each member fine-tuned 5 more epochs under stronger
everyday changes (`--augment-p 0.2 --augment-zoom-max 1.3`) taught by that ensemble (`cyborg train
--teacher`), and the fine-tuned members averaged again (v9; `--finetune-epochs 0` stops at v7);
`cyborg evaluate --split val --perturb all` of it (the model card's figures, robustness and
calibration), then `cyborg export` into the model repository (calibration chosen on validation by
cross-validated log-loss; operating points fitted on the validation images clean and under every
everyday change, `--points-under all`, so "fpr1" holds for re-compressed and resized photos too);
the same model again as an int8 version (`--int8-version`, default 12: `cyborg export --precision
int8`, 7-bit weights, each network's stem in fp32, calibrated on 64 training images, its operating
points fitted on its own scores; 1.6-1.9x the CPU throughput). With --student-version N, one network more is taught by the ensemble (`cyborg
train --teacher`: the last member's weights fine-tuned for 5 epochs with the ensemble's softened
scores beside the labels), evaluated and exported as version N: tried, not shipped (its AUC
rose, its true-positive rate at the default 1 % false-positive point fell; docs/model-card.md).
With --holdout SOURCE_FOLDER, one more run of the first member's recipe without that folder is
evaluated on it: what to expect from a generator family the model never saw.
The recipe runs unchanged on a GPU (`--device cuda`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a file

FOLDERS = ("faces", "sd21-faces", "portraits")  # under --data: FFHQ + StyleGAN, Stable Diffusion 2.1, studio portraits
ALIGNED = "faces"  # the FFHQ-aligned folder (used as is; the proxy face-part template fits it)
VAL_FRACTION = 0.1
RECIPE = [
    "--arch", "efficientnet_lite0", "--weights", "imagenet", "--image-size", "256", "--scale", "256",
    "--augment", "everyday", "--augment-p", "0.1", "--optimizer", "adamw", "--lr", "0.0005",
    "--weight-decay", "0.05", "--schedule", "cosine", "--epochs", "15", "--batch-size", "32", "--no-progress",
]  # fmt: skip
GUIDANCE = ["--guidance", "cyborg", "--alpha", "0.5"]
# The robust fine-tune (v9): each member's weights 5 more epochs under stronger everyday changes, taught
# by the members' first ensemble (docs/training.md, distillation).
FINETUNE = {"--lr": "0.0001", "--epochs": "5", "--augment-p": "0.2", "--augment-zoom-max": "1.3"}
# The student: a member's weights fine-tuned under the ensemble's scores (docs/training.md, distillation).
STUDENT = {"--lr": "0.0001", "--epochs": "5"}
DISTILL = ["--distill-weight", "1", "--distill-temperature", "2"]


def recipe_with(changes: dict[str, str]) -> list[str]:
    """RECIPE with the values of the flags in `changes` replaced (added, where RECIPE lacks the flag)."""
    recipe = list(RECIPE)
    for flag, value in changes.items():
        if flag in recipe:
            recipe[recipe.index(flag) + 1] = value
        else:
            recipe += [flag, value]
    return recipe


def cyborg(*args: str) -> None:
    command = [sys.executable, "-m", "cyborg.cli", "--log-level", "INFO", *args]
    print("+ cyborg " + " ".join(args), flush=True)
    from training.distributed import with_huge_pages  # fewer page faults in CPU training (docs/training.md)

    subprocess.run(command, check=True, env=with_huge_pages(dict(os.environ)))


def prepared_data(data: Path, work: Path, seed: int) -> list[str]:
    """WORK/data/FOLDER/{train,val}/CLASS: links to the aligned folder's images and to aligned crops of
    the others (`cyborg data align`, the largest face of each image), split as `cyborg train` splits
    the original folders for `seed`, so every version's validation images are the same faces."""
    from training.data import discover, split_samples

    out = work / "data"
    if out.is_dir():
        return [str(out / name) for name in FOLDERS]
    for name in FOLDERS:
        if name != ALIGNED:
            for label in ("real", "fake"):
                if (data / name / label).is_dir():
                    cyborg("data", "align", str(data / name / label), str(work / "aligned" / name / label), "--max-faces", "1")
    splits = split_samples(discover([str(data / name) for name in FOLDERS]), VAL_FRACTION, seed)
    for split in ("train", "val"):
        for sample in splits[split]:
            folder, label = sample.source.split("/")
            source = sample.path.resolve()
            if folder != ALIGNED:
                source = (work / "aligned" / folder / label / f"{sample.path.stem}_0.png").resolve()
                if not source.is_file():
                    continue  # no face found: the image is left out
            target = out / folder / split / label
            target.mkdir(parents=True, exist_ok=True)
            os.symlink(source, target / source.name)
    return [str(out / name) for name in FOLDERS]


def validation_figures(checkpoint: Path, data: list[str], maps: Path, device: str, out: Path, *options: str) -> dict:
    """`cyborg evaluate --split val` of `checkpoint` into `out` (with `options`); its AUC and per-source
    AUCs, each with its 95 % bootstrap interval."""
    cyborg("evaluate", str(checkpoint), *data, "--heatmaps", str(maps), "--split", "val", *options,
           "--device", device, "--out", str(out))  # fmt: skip
    result = json.loads((out / "results.json").read_text())
    return {"val_auc": result["auc"], "val_auc_ci": result["auc_ci"],
            "per_source_auc": {s: row["auc"] for s, row in result["per_source"].items()},
            "per_source_auc_ci": {s: row["auc_ci"] for s, row in result["per_source"].items()}}  # fmt: skip


def export(model: Path, version: int, args: argparse.Namespace, *options: str) -> None:
    cyborg("export", str(model), "--repository", str(args.repository), "--name", args.name,
           "--version", str(version), "--calibrate", args.calibrate, "--points-under", args.points_under,
           "--device", args.device, "--force", *options)  # fmt: skip


def int8_calibration_list(data: list[str], out: Path, count: int = 64) -> Path:
    """A file of `count` training images spread over the prepared folders (int8 activation ranges:
    the validation images stay for fitting and measuring)."""
    from core.images import image_files, spread

    paths = [path for folder in data for path in image_files(Path(folder) / "train")]
    out.write_text("\n".join(spread(paths, count)) + "\n")
    return out


def finetuned_ensemble(members: list[Path], seeds: list[int], teacher: Path, data: list[str], maps: Path,
                       args: argparse.Namespace) -> Path:  # fmt: skip
    """Each member fine-tuned (FINETUNE, --finetune-epochs) taught by `teacher`, averaged again."""
    tuned = []
    for seed, member in zip(seeds, members):
        run_dir = args.work / f"finetune-seed{seed}"
        if not (run_dir / "best.pt").is_file() or not (run_dir / "metrics.jsonl").is_file():
            recipe = recipe_with({**FINETUNE, "--epochs": str(args.finetune_epochs), "--weights": str(member)})
            cyborg("train", *data, "--heatmaps", str(maps), *recipe, *GUIDANCE, "--device", args.device,
                   "--teacher", str(teacher), *DISTILL, "--seed", str(seed), "--out", str(run_dir))  # fmt: skip
        tuned.append(run_dir / "best.pt")
    model = args.work / "ensemble-finetuned.pt"
    cyborg("ensemble", *map(str, tuned), "--out", str(model), "--device", args.device)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help=f"folder holding {', '.join(FOLDERS)}")
    parser.add_argument("--seed", type=int, default=0, help="the validation split's seed (default 0)")
    parser.add_argument("--members", default="0,1", help="training seeds: one network per seed, several averaged with `cyborg ensemble` (default 0,1: v7, fine-tuned v9; 1 alone is v6, half the training and serving time)")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="with several members: fine-tune each this many epochs under stronger changes, taught by their ensemble, and average them again (default 5: v9; 0: v7)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("runs/default-model"), help="scratch folder for data links, maps and runs")
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--name", default="cyborg-faces")
    parser.add_argument("--version", type=int, default=9)
    parser.add_argument("--calibrate", default="auto", help="export's --calibrate (default auto: the lowest cross-validated log-loss)")
    parser.add_argument("--points-under", default="all", help="export's --points-under: the changes the operating points are fitted under (default all)")
    parser.add_argument("--int8-version", type=int, default=12, help="also export the model with --precision int8 (7-bit weights, fp32 stems) as this version (default 12; 0: none)")
    parser.add_argument("--student-version", type=int, default=0, help="also teach one network by the ensemble and export it as this version (default 0: none)")
    parser.add_argument("--holdout", default=None, help=f"one of {', '.join(FOLDERS)}: also train without it and evaluate on it")
    args = parser.parse_args()
    folders = [args.data / name for name in FOLDERS]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        parser.error(f"missing data folders: {', '.join(missing)} (see ../shared/data/README.md)")
    try:
        seeds = [int(seed) for seed in args.members.split(",") if seed.strip()]
    except ValueError:
        parser.error(f"--members {args.members!r}: a comma list of integer seeds")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--members {args.members!r}: one or more different seeds")
    versions = [v for v in (args.version, args.int8_version, args.student_version) if v]
    if len(set(versions)) != len(versions):
        parser.error(f"--version {args.version}, --int8-version {args.int8_version} and --student-version "
                     f"{args.student_version}: different version numbers (0 leaves one out)")  # fmt: skip
    if args.finetune_epochs < 0:
        parser.error(f"--finetune-epochs {args.finetune_epochs}: 0 or more")
    if args.holdout is not None and args.holdout not in FOLDERS:
        parser.error(f"--holdout: one of {', '.join(FOLDERS)}")
    started = time.monotonic()
    maps = args.work / "maps"
    if not (maps / "PROVENANCE.json").is_file():
        cyborg("saliency", "prior", str(args.data / ALIGNED), "--out", str(maps))
    data = prepared_data(args.data, args.work, args.seed)
    common = ["--heatmaps", str(maps), *RECIPE, *GUIDANCE, "--device", args.device]
    members = []
    for seed in seeds:
        run_dir = args.work / f"cyborg-seed{seed}"
        if not (run_dir / "best.pt").is_file() or not (run_dir / "metrics.jsonl").is_file():
            cyborg("train", *data, *common, "--seed", str(seed), "--out", str(run_dir))
        members.append(run_dir / "best.pt")
    model, finetune = members[0], None
    if len(members) > 1:
        model = args.work / "ensemble.pt"
        cyborg("ensemble", *map(str, members), "--out", str(model), "--device", args.device)
        if args.finetune_epochs > 0:
            model = finetuned_ensemble(members, seeds, model, data, maps, args)
            finetune = {"recipe": {**FINETUNE, "--epochs": str(args.finetune_epochs)}, "distill": DISTILL}
    full = ["--perturb", "all", "--calibrate", args.calibrate]  # the model card's figures: robustness and calibration
    summary = {"members": seeds, "split_seed": args.seed, "recipe": RECIPE + GUIDANCE, "model": str(model), "finetune": finetune,
               **validation_figures(model, data, maps, args.device, args.work / "val", *full)}  # fmt: skip
    if args.holdout is not None:
        kept = [folder for folder in data if Path(folder).name != args.holdout]
        run_dir = args.work / f"without-{args.holdout}"
        if not (run_dir / "best.pt").is_file():
            cyborg("train", *kept, *common, "--seed", str(seeds[0]), "--out", str(run_dir))
        summary["holdout"] = {"folder": args.holdout,
                              **validation_figures(run_dir / "best.pt", data, maps, args.device, run_dir / "val", "--perturb", "clean")}  # fmt: skip
    export(model, args.version, args)
    if args.int8_version:
        calibration = int8_calibration_list(data, args.work / "int8-calibration.txt")
        export(model, args.int8_version, args, "--precision", "int8", "--calibration-data", str(calibration))
        summary["int8_version"] = args.int8_version
    if args.student_version and len(members) > 1:
        student = args.work / "student"
        if not (student / "best.pt").is_file():
            cyborg("train", *data, "--heatmaps", str(maps), *recipe_with({**STUDENT, "--weights": str(members[-1])}), *GUIDANCE,
                   "--device", args.device, "--teacher", str(model), *DISTILL, "--seed", str(seeds[-1]), "--out", str(student))  # fmt: skip
        summary["student"] = {"version": args.student_version,
                              **validation_figures(student / "best.pt", data, maps, args.device, student / "val", *full)}  # fmt: skip
        export(student / "best.pt", args.student_version, args)
    elapsed = time.monotonic() - started
    summary["seconds"] = round(elapsed)
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"default model rebuilt in {elapsed / 60:.1f} min: {args.repository / args.name / str(args.version)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
