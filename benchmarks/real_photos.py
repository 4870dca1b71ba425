"""Real faces in whole photos called fake: run the detector on your own real photos.

    .venv/bin/python -m benchmarks.real_photos FOLDER [FOLDER...] --model-repository models [--model cyborg-faces] \
        [--versions 6,7] [--address HOST:PORT] [--show 10] [--json OUT.json]

Every image under the folders (recursively; `core.images.IMAGE_EXTENSIONS`) goes to a server with
`input_kind="photo"`: the server finds, aligns and scores each face. Every face is real, so each one
called fake is a false positive. Per version: images, images with no face found, faces scored, and
at each operating point the model records (`eer`, `fpr1`, `fpr5` and its default, read from the
served contract through `core.thresholds.resolve_operating_point`; thresholds on the calibrated
probability, `core.contract.called_fake` decides) the faces called fake with a 95 % Wilson interval
and the photos with at least one such face; the probability quantiles (10/50/90 %); the same split
by face size (box width below / at or above the median width); and the --show faces with the
highest fake probability, to look at.

Without --address, `cyborg serve --model-repository REPO --version-policy V1,V2,...` runs as a
subprocess on a free loopback port (`benchmarks.serve.server_process`) and is stopped at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from benchmarks.commands import positive_ints
from core.contract import ModelContract, called_fake
from core.errors import UserError
from core.images import IMAGE_EXTENSIONS, image_files
from core.thresholds import NAMED_POINTS, resolve_operating_point

CONFIDENCE = 0.95
Z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)  # 1.95996...
QUANTILES = (10, 50, 90)  # percent


@dataclasses.dataclass(frozen=True)
class FaceScore:
    """One scored face of one photo, as the server answered it."""

    image: str
    face: int  # its index in the photo's faces (largest first, as the server lists them)
    box: tuple[float, float, float, float]  # left, top, right, bottom in the photo's upright pixels
    probability: float  # calibrated fake probability

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]


# ---- the statistics (pure) -------------------------------------------------------------------
def wilson_interval(k: int, n: int, z: float = Z) -> tuple[float, float] | None:
    """The Wilson score interval of k successes in n trials (None when n is 0)."""
    if n == 0:
        return None
    centre, spread = (k + z * z / 2) / (n + z * z), z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return max(0.0, centre - spread), min(1.0, centre + spread)


def quantiles(probabilities: Sequence[float]) -> dict[str, float] | None:
    """The 10/50/90 % quantiles (numpy's linear interpolation), None for no faces."""
    if not len(probabilities):
        return None
    values = np.quantile(np.asarray(probabilities, dtype=np.float64), [q / 100 for q in QUANTILES])
    return {f"p{q}": float(v) for q, v in zip(QUANTILES, values)}


def called_fake_at(faces: Sequence[FaceScore], points: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Per operating point: faces called fake (probability >= threshold), their share and its 95 % interval."""
    probabilities = np.array([f.probability for f in faces], dtype=np.float64)
    rows = {}
    for name, threshold in points.items():
        k, n = int(called_fake(probabilities, threshold).sum()), len(faces)
        interval = wilson_interval(k, n)
        rows[name] = {"threshold": threshold, "called_fake": k, "faces": n, "share": k / n if n else None,
                      "ci95": list(interval) if interval else None}  # fmt: skip
    return rows


def face_summary(faces: Sequence[FaceScore], points: dict[str, float]) -> dict[str, Any]:
    return {"faces": len(faces), "operating_points": called_fake_at(faces, points),
            "probability_quantiles": quantiles([f.probability for f in faces])}  # fmt: skip


def size_split(faces: Sequence[FaceScore], points: dict[str, float]) -> dict[str, Any]:
    """The faces split at the median box width: `below` it and `at_or_above` it, each summarised."""
    if not faces:
        return {"median_width": None, "below": face_summary([], points), "at_or_above": face_summary([], points)}
    median = float(np.median([f.width for f in faces]))
    groups = {"below": [f for f in faces if f.width < median], "at_or_above": [f for f in faces if f.width >= median]}
    split: dict[str, Any] = {"median_width": median}
    for name, group in groups.items():
        widths = [f.width for f in group]
        split[name] = face_summary(group, points) | {"width_range": [min(widths), max(widths)] if widths else None}
    return split


def top_faces(faces: Iterable[FaceScore], count: int) -> list[dict[str, Any]]:
    """The `count` faces with the highest fake probability (ties: by image, then face index)."""
    ranked = sorted(faces, key=lambda f: (-f.probability, f.image, f.face))[: max(count, 0)]
    return [{"image": f.image, "face": f.face, "box": list(f.box), "width": f.width, "probability": f.probability} for f in ranked]


def images_flagged(faces: Sequence[FaceScore], points: dict[str, float]) -> dict[str, int]:
    """Per operating point: photos with at least one face called fake."""
    return {name: len({f.image for f in faces if called_fake(f.probability, threshold)}) for name, threshold in points.items()}


def version_report(results: Sequence, points: dict[str, float], default_point: str, show: int) -> dict[str, Any]:
    """The report of one version from its per-image results (serving.client Detection or DetectionError)."""
    faces, errors = [], []
    statuses, not_scored = Counter(), Counter()
    for result in results:
        if not result.ok:
            errors.append(result.to_dict())
            continue
        statuses[result.status] += 1
        for index, face in enumerate(result.faces):
            if face["status"] == "scored":
                faces.append(FaceScore(result.image, index, tuple(face["box"]), float(face["probability"])))
            else:
                not_scored[face["status"]] += 1
    return {
        "images": len(results),
        "images_no_face": statuses.get("no_face", 0),
        "images_faces_too_small": statuses.get("faces_too_small", 0),  # faces found, none big enough to score
        "images_failed": len(errors),
        "faces_scored": len(faces),
        "faces_not_scored": dict(not_scored),
        "default_operating_point": default_point,
        "operating_points": called_fake_at(faces, points),
        "probability_quantiles": quantiles([f.probability for f in faces]),
        "images_called_fake": images_flagged(faces, points),
        "by_size": size_split(faces, points),
        "top_faces": top_faces(faces, show),
        "errors": errors,
    }


def operating_points(contract: ModelContract) -> tuple[dict[str, float], str]:
    """({name: threshold on the probability}, the default point's name) of a served contract: every
    named point the model records (eer, fpr1, fpr5) and its default (a model.json without operating
    points has only `default`, its threshold)."""
    default = resolve_operating_point("", contract)
    points = {}
    for name in NAMED_POINTS:
        try:
            points[name] = resolve_operating_point(name, contract).threshold
        except UserError:
            continue  # a point this model does not record
    points.setdefault(default.name, default.threshold)
    return points, default.name


# ---- talking to the server -------------------------------------------------------------------
def photo_paths(folders: Sequence[str | Path]) -> list[str]:
    """Every image file under the folders; UserError for a folder that is missing or holds none."""
    paths = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise UserError(f"{folder}: not a folder")
        found = image_files(Path(folder), flag="FOLDER")
        if not found:
            raise UserError(f"{folder}: no images (files ending {', '.join(IMAGE_EXTENSIONS)})")
        paths += found
    return paths


def served_contract(client, model: str, version: int, address: str) -> ModelContract:
    """The contract the server serves for (model, version), with the server's own words when it does not."""
    from serving.client import ClientError

    try:
        info = client.get_model(model, version)
    except ClientError as error:
        raise UserError(server_problem(error, address, f"--versions {version}")) from error
    if not info.get("contract"):
        raise UserError(f"{info['name']} v{info['version']}: the server sent no contract (model.json)")
    return ModelContract.from_dict(info["contract"])


def served_versions(client, model: str, address: str) -> tuple[str, list[int]]:
    """(the model's name, every version the server serves of it, newest first)."""
    from serving.client import ClientError

    try:
        models, default = client.list_models()
    except ClientError as error:
        raise UserError(server_problem(error, address)) from error
    name = model or default
    versions = sorted({m["version"] for m in models if m["name"] == name}, reverse=True)
    if not versions:
        raise UserError(f"--model {name!r}: not served by {address} (serving: {', '.join(sorted({m['name'] for m in models})) or 'none'})")
    return name, versions


def server_problem(error, address: str, what: str = "") -> str:
    """One line for a call that failed as a whole: unreachable, or NOT_FOUND naming what is served."""
    if error.code.name == "UNAVAILABLE":
        return f"--address {address}: cannot reach the server ({error})"
    return f"{what + ': ' if what else ''}{error}"


def score_photos(client, paths: Sequence[str], model: str, version: int, address: str) -> list:
    """Each photo's result (Detection or DetectionError), in chunks as `cyborg detect` sends them."""
    from serving.client import ClientError, DetectionError
    from serving.commands.detect import FATAL, chunks, one_by_one

    options = {"model": model, "version": version, "input_kind": "photo"}
    results = []
    for chunk in chunks(list(paths)):
        answers: dict[str, Any] = {}
        data: dict[str, bytes] = {}
        for path in chunk:
            try:
                data[path] = Path(path).read_bytes()
            except OSError as error:
                answers[path] = DetectionError(path, "NOT_FOUND", f"cannot read ({error.strerror})")
        try:
            try:
                answers.update(zip(data, client.detect_batch(list(data.values()), **options)) if data else ())
            except ClientError as error:
                if error.code.name in FATAL:
                    raise
                answers.update((path, one_by_one(client, item, options)) for path, item in data.items())  # e.g. a chunk over the message limit
        except ClientError as error:
            raise UserError(server_problem(error, address, f"v{version}")) from error
        for path in chunk:
            answers[path].image = path
            results.append(answers[path])
    return results


def measure(address: str, paths: Sequence[str], model: str, versions: Sequence[int] | None, show: int, timeout: float) -> dict[str, Any]:
    """The report for every version (all the server serves of the model when `versions` is None)."""
    from serving.client import DetectorClient

    with DetectorClient(address, timeout=timeout) as client:
        name, served = served_versions(client, model, address)
        report: dict[str, Any] = {"model": name, "address": address, "images": len(paths), "interval": f"Wilson score, {CONFIDENCE:.0%}",
                                  "versions": {}}  # fmt: skip
        for version in versions or served:
            contract = served_contract(client, name, version, address)
            points, default = operating_points(contract)
            results = score_photos(client, paths, name, version, address)
            report["versions"][str(version)] = {"architecture": contract.architecture, "precision": contract.precision,
                                                "calibration": contract.calibration,
                                                **version_report(results, points, default, show)}  # fmt: skip
    return report


def run(folders: Sequence[str], repository: str | None, model: str = "", versions: Sequence[int] | None = None,
        address: str | None = None, show: int = 10, timeout: float = 120.0) -> dict[str, Any]:  # fmt: skip
    """Measure against the server at `address`, or against `cyborg serve` started here on `repository`."""
    paths = photo_paths(folders)
    if address:
        return measure(address, paths, model, versions, show, timeout) | {"server": "given", "folders": list(folders)}
    if not repository or not Path(repository).is_dir():
        raise UserError(f"--model-repository {repository}: not a folder (or give --address of a running server)")
    from benchmarks.serve import server_process

    check_repository(Path(repository), model, versions)
    policy = ",".join(map(str, versions)) if versions else "latest"
    with server_process(Path(repository), extra=[f"--version-policy={policy}"]) as (started, _):
        report = measure(started, paths, model, versions, show, timeout)
    return report | {"server": f"cyborg serve --model-repository {repository} --version-policy {policy}", "folders": list(folders)}


def check_repository(repository: Path, model: str, versions: Sequence[int] | None) -> None:
    """Refuse before starting a server that would serve none of `versions` (it would never be ready);
    a version missing beside others that serve is named by the server itself (NOT_FOUND)."""
    from serving.repository import scan

    held = scan(repository)
    if model and model not in held:
        raise UserError(f"--model {model}: not in {repository} (holds: {', '.join(held) or 'no model version folders'})")
    if not held:
        raise UserError(f"--model-repository {repository}: no model version folders")
    names = [model] if model else list(held)
    if versions and not any(version in dict(held[name]) for name in names for version in versions):
        present = "; ".join(f"{name} versions {', '.join(str(v) for v, _ in held[name])}" for name in names)
        raise UserError(f"--versions {','.join(map(str, versions))}: none of them is in {repository} ({present})")


# ---- the report ------------------------------------------------------------------------------
def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['images']} photos from {', '.join(report['folders'])}; server: {report['server']}; "
             f"intervals: {report['interval']}"]  # fmt: skip
    for version, row in report["versions"].items():
        skipped = ", ".join(f"{count} {status}" for status, count in row["faces_not_scored"].items())
        lines += [
            "",
            f"{report['model']} v{version} ({row['architecture']}, {row['precision']}): {row['images']} images, {row['images_no_face']} with no face found, "
            f"{row['images_faces_too_small']} with faces too small, {row['images_failed']} failed; {row['faces_scored']} faces scored"
            + (f" (not scored: {skipped})" if skipped else ""),
            f"  {'point':<8}{'threshold':>10}{'called fake':>14}{'share':>8}  {'95 % interval':<18}{'photos flagged':>15}",
        ]
        for name, point in row["operating_points"].items():
            label = name + ("*" if name == row["default_operating_point"] else "")
            lines.append(f"  {label:<8}{point['threshold']:>10.3f}{point['called_fake']:>8} / {point['faces']:<3}{_percent(point['share']):>8}  "
                         f"{_interval(point['ci95']):<18}{row['images_called_fake'][name]:>9} / {row['images']:<3}")  # fmt: skip
        lines.append("  (* the model's default point; photos flagged: with at least one face called fake)")
        lines.append(f"  fake probability {_quantiles(row['probability_quantiles'])}")
        split = row["by_size"]
        if split["median_width"] is not None:
            lines.append(f"  by face width (median {split['median_width']:.0f} px):")
            for name, label in (("below", "<"), ("at_or_above", ">=")):
                group = split[name]
                shares = ", ".join(f"{p} {g['called_fake']}/{g['faces']}" for p, g in group["operating_points"].items())
                lines.append(f"    width {label:<2} {split['median_width']:.0f} px: {group['faces']} faces; called fake {shares}; "
                             f"{_quantiles(group['probability_quantiles'])}")  # fmt: skip
        if row["top_faces"]:
            lines.append(f"  highest fake probability ({len(row['top_faces'])}):")
            for face in row["top_faces"]:
                box = ",".join(f"{v:.0f}" for v in face["box"])
                lines.append(f"    {face['probability']:.4f}  {face['image']}  face {face['face']}  box {box}")
        for error in row["errors"]:
            lines.append(f"  failed: {error['image']}: {error['code']} {error['error']}")
    return "\n".join(lines)


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def _interval(ci: list[float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:.1%}, {ci[1]:.1%}]"


def _quantiles(values: dict[str, float] | None) -> str:
    return "p10/p50/p90 -" if values is None else "p10/p50/p90 " + " / ".join(f"{v:.3f}" for v in values.values())


def version_list(text: str) -> list[int]:
    """argparse type of --versions: positive version numbers, each once, in the order given."""
    return list(dict.fromkeys(positive_ints(text)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", metavar="FOLDER", help="folders of real photos (searched recursively)")
    parser.add_argument("--model-repository", help="model repository to serve (needed without --address)")
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--versions", type=version_list, help="comma-separated versions, e.g. 6,7 (default: every version served; "
                        "a server started here serves the newest)")  # fmt: skip
    parser.add_argument("--address", help="HOST:PORT of a running server (default: start `cyborg serve` here)")
    parser.add_argument("--show", type=int, default=10, help="faces with the highest fake probability to list per version (default: 10)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call of up to 16 photos (default: 120)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the report here")
    args = parser.parse_args(argv)
    try:
        report = run(args.folders, args.model_repository, args.model, args.versions, args.address, args.show, args.timeout)
    except UserError as error:
        print(f"real_photos: error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
