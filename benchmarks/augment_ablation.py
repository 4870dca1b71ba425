"""Which augmentation helps: the same short recipe trained with each setting, then `cyborg evaluate
--perturb all` on the same validation images.

    .venv/bin/python -m benchmarks.augment_ablation --data ../shared/data --per-source 200 --epochs 3 \
        --variants none,everyday:0.1,everyday:0.5 --out runs/ablation

A seeded subset of each source folder (symbolic links, --per-source images of each class folder)
keeps it to minutes on a CPU; each variant is `AUGMENT:P` (`none`, `everyday:0.1`, `jpeg,blur:0.5`...)
and otherwise uses the default model's recipe (scripts/default_model.py) with CE. Prints clean and
perturbed AUC per variant (mean over perturbations and the worst one) and writes OUT/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

FOLDERS = {"faces": ("real", "fake"), "sd21-faces": ("fake",), "portraits": ("real",)}


def subset(data: Path, out: Path, per_source: int, seed: int) -> list[str]:
    folders = []
    for folder, classes in FOLDERS.items():
        for name in classes:
            files = sorted((data / folder / name).iterdir())
            random.Random(f"{seed}:{folder}:{name}").shuffle(files)
            target = out / folder / name
            target.mkdir(parents=True, exist_ok=True)
            for path in files[:per_source]:
                link = target / path.name
                if not link.exists():
                    os.symlink(path.resolve(), link)
        folders.append(str(out / folder))
    return folders


def cyborg(*args: str) -> None:
    print("+ cyborg " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "cyborg.cli", "--log-level", "WARNING", *args], check=True)


def default_recipe() -> list[str]:
    """scripts/default_model.py's RECIPE (one home for the recipe)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("default_model", Path(__file__).resolve().parents[1] / "scripts" / "default_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.RECIPE)


def with_flags(recipe: list[str], **flags: str) -> list[str]:
    """The recipe with some `--flag value` pairs replaced (or added)."""
    recipe = list(recipe)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in recipe:
            recipe[recipe.index(flag) + 1] = value
        else:
            recipe += [flag, value]
    return recipe


def summarise(results: dict) -> dict:
    table = results["perturbations"]
    changed = {name: row["auc"] for name, row in table.items() if name != "clean"}
    worst = min(changed, key=changed.get)
    return {"clean_auc": table["clean"]["auc"], "mean_perturbed_auc": sum(changed.values()) / len(changed),
            "worst": worst, "worst_auc": changed[worst],
            "per_perturbation": {name: row["auc"] for name, row in table.items()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--per-source", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--variants", default="none,everyday:0.1,everyday:0.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    args = parser.parse_args()
    folders = subset(args.data, args.out / "data", args.per_source, args.seed)
    report = {"per_source": args.per_source, "epochs": args.epochs, "seed": args.seed, "variants": {}}
    for variant in args.variants.split(","):
        augment, _, p = variant.partition(":")
        name = variant.replace(":", "-p").replace(",", "+")
        run_dir = args.out / name
        recipe = with_flags(default_recipe(), augment=augment, augment_p=p or "0.1", epochs=str(args.epochs),
                            val_fraction=str(args.val_fraction), seed=str(args.seed), device=args.device)  # fmt: skip
        if not (run_dir / "best.pt").is_file():
            cyborg("train", *folders, *recipe, "--guidance", "ce", "--alpha", "1", "--out", str(run_dir))
        if not (run_dir / "val" / "results.json").is_file():
            cyborg("evaluate", str(run_dir / "best.pt"), *folders, "--split", "val", "--perturb", "all", "--device", args.device,
                   "--cams", "0", "--out", str(run_dir / "val"))  # fmt: skip
        report["variants"][variant] = summarise(json.loads((run_dir / "val" / "results.json").read_text()))
    (args.out / "ablation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'variant':<22}{'clean':>8}{'mean perturbed':>16}{'worst':>24}")
    for variant, row in report["variants"].items():
        print(f"{variant:<22}{row['clean_auc']:>8.4f}{row['mean_perturbed_auc']:>16.4f}{row['worst']:>14} {row['worst_auc']:.4f}")


if __name__ == "__main__":
    main()
