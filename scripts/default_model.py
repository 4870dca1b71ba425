"""Retrain and re-export the embedded default model from scratch, with the project's own commands.

    python scripts/default_model.py --faces ../shared/data/faces --seed 0   (what `make default-model` runs)

Steps: proxy saliency maps (`cyborg saliency prior`), a CYBORG, a CE and a `swap` run with the same
recipe and seed (`cyborg train`), the winner picked on the validation split (never test data),
`cyborg evaluate` on that split for both (the model card's figures and CAM pictures), then
`cyborg export` into the model repository. Deterministic for a given seed on CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RECIPE = [
    "--arch", "efficientnet_lite0", "--weights", "imagenet", "--image-size", "224",
    "--epochs", "6", "--lr-step", "4", "--batch-size", "20", "--device", "cpu", "--no-progress",
]  # fmt: skip
RUNS = {
    "cyborg": ["--guidance", "cyborg", "--alpha", "0.5"],
    "ce": ["--guidance", "ce", "--alpha", "1"],
    "swap": ["--guidance", "swap"],  # docs/guidance.md's recommendation on the decoy benchmark
}


def cyborg(*args: str) -> None:
    command = [sys.executable, "-m", "cyborg.cli", "--log-level", "WARNING", *args]
    print("+ cyborg " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def best_epoch(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max(rows, key=lambda row: (row["val_auc"] if row["val_auc"] is not None else -1.0, -row["epoch"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=Path("../shared/data/faces"), help="folder with real/ and fake/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/default-model"), help="scratch folder for maps and runs")
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--name", default="cyborg-faces")
    parser.add_argument("--version", type=int, default=1)
    args = parser.parse_args()
    if not (args.faces / "real").is_dir() or not (args.faces / "fake").is_dir():
        parser.error(f"{args.faces}: expected real/ and fake/ folders (the shared faces data set)")
    started = time.monotonic()
    maps = args.work / "maps"
    if not (maps / "PROVENANCE.json").is_file():
        cyborg("saliency", "prior", str(args.faces), "--out", str(maps))
    results = {}
    for name, flags in RUNS.items():
        run_dir = args.work / name
        cyborg("train", str(args.faces), "--heatmaps", str(maps), *RECIPE, *flags, "--seed", str(args.seed), "--out", str(run_dir))
        cyborg("evaluate", str(run_dir / "best.pt"), str(args.faces), "--heatmaps", str(maps), "--split", "val", "--out", str(run_dir / "val"))
        results[name] = {"best": best_epoch(run_dir), "val": json.loads((run_dir / "val" / "results.json").read_text())}
    winner = max(results, key=lambda name: results[name]["best"]["val_auc"] or -1.0)
    cyborg(
        "export", str(args.work / winner / "best.pt"), "--repository", str(args.repository),
        "--name", args.name, "--version", str(args.version), "--force",
    )  # fmt: skip
    elapsed = time.monotonic() - started
    summary = {
        "winner": winner,
        "seed": args.seed,
        "recipe": RECIPE,
        "runs": {name: {"flags": RUNS[name], "best_epoch": r["best"]["epoch"], "val_auc": r["best"]["val_auc"], "val_eer": r["best"]["val_eer"]} for name, r in results.items()},
        "seconds": round(elapsed),
    }
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"default model rebuilt in {elapsed / 60:.1f} min: {args.repository / args.name / str(args.version)} ({winner})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
