"""`cyborg models list`: the models in a repository, read from disk (no server, no engine)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", default="models", help="repository folder (default: models)")
    parser.add_argument("--json", action="store_true", help="one JSON object per version instead of a table")


def describe(root) -> list[dict]:
    """One row per version folder: its contract's key facts, and 'ok' or the problem found."""
    from core.contract import read_contract
    from core.errors import ContractError
    from serving.repository import check_folder, scan

    rows = []
    for name, versions in scan(root).items():
        for version, folder in versions:
            row = {"name": name, "version": version, "architecture": "", "input": "", "cam": "", "threshold": None, "saliency": ""}
            try:
                contract = read_contract(folder, verify=True)
                check_folder(folder, contract)
            except ContractError as error:
                row["status"] = f"error: {error}"
            else:
                row.update(
                    architecture=contract.architecture,
                    input=f"{contract.input_height}x{contract.input_width}",
                    cam=f"{contract.cam_height}x{contract.cam_width}",
                    threshold=contract.threshold,
                    saliency=contract.training.get("saliency", "none"),
                    auc=contract.metrics.get("validation", {}).get("auc"),
                    files=sorted(contract.files),
                    status="ok",
                )
            rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from core.errors import UserError

    if not Path(args.model_repository).is_dir():
        raise UserError(f"--model-repository {args.model_repository}: not a folder")
    rows = describe(args.model_repository)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    if not rows:
        print(f"no models in {args.model_repository}")
        return 0
    columns = ("name", "version", "architecture", "input", "cam", "threshold", "saliency", "status")
    table = [[("" if row.get(c) is None else (f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]))) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0
