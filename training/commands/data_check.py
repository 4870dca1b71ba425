"""`cyborg data check DATA [--csv FILE --heatmaps DIR] [--json]`: report problems in a data set.

Errors (exit 1): missing or unreadable images, unreadable maps, a class with no images, the same
image content in two splits (a leak) or under both labels. Warnings (exit 0): images without a map
(they contribute CE only), constant maps, maps of another size than their image, class imbalance,
the same file name in two splits, duplicate content within a split, file names that make maps
ambiguous. Every image is fully decoded, exactly as training will decode it.
"""

from __future__ import annotations

import argparse
from typing import Any

IMBALANCE_RATIO = 0.5  # warn when a split's smaller class has under half the images of the larger


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="plain-layout folder, or the root the CSV's paths hang from")
    parser.add_argument("--csv", metavar="FILE", help="the authors' CSV (split,class,path[,source])")
    parser.add_argument("--heatmaps", metavar="DIR", help="saliency maps matched by file name (default: DATA/maps)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


class Report:
    """Problems found, grouped by kind, each with every file it concerns."""

    def __init__(self) -> None:
        self.problems: dict[str, dict[str, Any]] = {}

    def add(self, severity: str, kind: str, message: str, item: str) -> None:
        entry = self.problems.setdefault(kind, {"severity": severity, "kind": kind, "message": message, "files": []})
        entry["files"].append(item)

    def count(self, severity: str) -> int:
        return sum(1 for p in self.problems.values() if p["severity"] == severity)

    def as_list(self) -> list[dict[str, Any]]:
        order = {"error": 0, "warning": 1}
        return sorted(self.problems.values(), key=lambda p: (order[p["severity"]], p["kind"]))


def inspect_images(samples, report: Report) -> dict[Any, tuple[tuple[int, int], str]]:
    """Decode every image; return {sample: ((width, height), sha256)} for the readable ones."""
    import hashlib

    from tqdm import tqdm

    from core.errors import ImageError
    from core.images import decode_image

    seen = {}
    for sample in tqdm(samples, desc="images", unit="img", disable=None, leave=False):
        try:
            data = sample.path.read_bytes()
        except FileNotFoundError:
            report.add("error", "missing_image", "images listed but not found", str(sample.path))
            continue
        except OSError as error:
            report.add("error", "unreadable_image", "images that cannot be read or decoded", f"{sample.path} ({error.strerror})")
            continue
        try:
            size = decode_image(data, name=str(sample.path)).size
        except ImageError as error:
            report.add("error", "unreadable_image", "images that cannot be read or decoded", str(error))
            continue
        seen[sample] = (size, hashlib.sha256(data).hexdigest())
    return seen


def inspect_maps(samples, images, maps_expected: bool, report: Report) -> None:
    from training.saliency import MapError, map_stats

    stats = {}
    for sample in samples:
        if sample not in images:
            continue  # a missing or unreadable image is already an error
        if sample.map_path is None:
            if maps_expected:
                report.add("warning", "missing_map", "images without a saliency map (CE only)", str(sample.path))
            continue
        if sample.map_path not in stats:
            try:
                stats[sample.map_path] = map_stats(sample.map_path)
            except MapError as error:
                stats[sample.map_path] = error
        stat = stats[sample.map_path]
        if isinstance(stat, MapError):
            report.add("error", "unreadable_map", "saliency maps that cannot be read", str(stat))
            continue
        if stat.constant:
            report.add("warning", "constant_map", "constant saliency maps (no information; prepared as zeros)", str(sample.map_path))
        if images[sample][0] != stat.size:
            (iw, ih), (mw, mh) = images[sample][0], stat.size
            report.add(
                "warning",
                "map_size",
                "saliency maps of another size than their image (resized to the CAM grid anyway)",
                f"{sample.map_path} ({mw}x{mh}, image {iw}x{ih})",
            )


def inspect_overlaps(samples, images, maps_used: bool, report: Report) -> None:
    from collections import defaultdict

    by_hash, by_name = defaultdict(list), defaultdict(list)
    for sample in samples:
        by_name[sample.path.name].append(sample)
        if sample in images:
            by_hash[images[sample][1]].append(sample)
    for group in by_hash.values():
        if len(group) < 2:
            continue
        files = " = ".join(f"{s.path} [{s.split}]" for s in group)
        if len({s.label for s in group}) > 1:
            report.add("error", "conflicting_labels", "the same image content under both labels", files)
        if len({s.split for s in group}) > 1:
            report.add("error", "shared_content", "the same image content in more than one split, a leak", files)
        else:
            report.add("warning", "duplicate_content", "the same image content more than once within a split", files)
    for name, group in by_name.items():
        if len(group) < 2:
            continue
        if len({s.split for s in group}) > 1:
            splits = ", ".join(sorted({s.split for s in group}))
            report.add("warning", "shared_name", "the same file name in more than one split", f"{name} ({splits})")
        if maps_used:
            report.add("warning", "ambiguous_map_name", "file names used by several images: maps matched by name are shared", f"{name} ({len(group)} images)")


def inspect_balance(samples, report: Report) -> None:
    from core.contract import CLASS_NAMES

    for label, name in enumerate(CLASS_NAMES):
        if not any(s.label == label for s in samples):
            report.add("error", "missing_class", "a class with no images", name)
    for split in sorted({s.split for s in samples}):
        counts = [sum(1 for s in samples if s.split == split and s.label == label) for label in range(len(CLASS_NAMES))]
        if min(counts) > 0 and min(counts) < IMBALANCE_RATIO * max(counts):
            detail = ", ".join(f"{n} {name}" for n, name in zip(counts, CLASS_NAMES))
            report.add("warning", "class_imbalance", f"splits whose smaller class has under {IMBALANCE_RATIO:.0%} of the larger", f"{split}: {detail}")


def check(data, csv=None, heatmaps=None) -> dict[str, Any]:
    """The full report as a JSON-ready dict ("errors" > 0 means the data is not usable as is)."""
    from pathlib import Path

    from training.data import discover, saliency_provenance, summarise

    samples = discover(data, csv=csv, heatmaps=heatmaps)
    report = Report()
    images = inspect_images(samples, report)
    with_map = sum(1 for s in samples if s.map_path is not None)
    inspect_maps(samples, images, maps_expected=heatmaps is not None or with_map > 0, report=report)
    inspect_overlaps(samples, images, maps_used=with_map > 0, report=report)
    inspect_balance(samples, report)
    provenance = saliency_provenance(samples)
    if with_map == 0:
        report.add("warning", "no_maps", "no saliency maps: every image contributes CE only (`cyborg saliency prior` writes proxy maps)", str(data))
    problems = report.as_list()
    notes = []
    splits = {s.split for s in samples}
    if "val" not in splits:
        notes.append("no validation split: `cyborg train` holds out a seeded, label-stratified --val-fraction of train")
    if "test" not in splits:
        notes.append("no test split: evaluate on separate data (`cyborg evaluate CHECKPOINT DATA`)")
    return {
        "data": str(Path(data)),
        "csv": str(csv) if csv else None,
        "heatmaps": str(heatmaps) if heatmaps else None,
        "images": len(samples),
        "readable": len(images),
        "counts": summarise(samples),
        "maps": {"with_map": with_map, "without_map": len(samples) - with_map, "provenance": provenance},
        "errors": report.count("error"),
        "warnings": report.count("warning"),
        "problems": problems,
        "notes": notes,
    }


def format_report(result: dict[str, Any], limit: int = 5) -> str:
    """The report as text: counts per split, class and source, then one block per problem."""
    lines = [f"data: {result['data']}" + (f" (csv {result['csv']})" if result["csv"] else "")]
    maps = result["maps"]
    lines.append(f"images: {result['images']} ({result['readable']} readable); maps: {maps['with_map']} ({maps['provenance']})")
    lines.append(f"{'split':<8}{'class':<8}{'source':<24}{'images':>8}")
    for split, counts in result["counts"].items():
        for key, count in counts.items():
            name, _, source = key.partition("/")
            if source:
                lines.append(f"{split:<8}{name:<8}{source:<24}{count:>8}")
    for split, counts in result["counts"].items():
        lines.append(f"{split}: {counts.get('real', 0)} real, {counts.get('fake', 0)} fake")
    for problem in result["problems"]:
        files = problem["files"]
        lines.append(f"{problem['severity']}: {problem['message']} ({len(files)})")
        lines += [f"    {item}" for item in files[:limit]]
        if len(files) > limit:
            lines.append(f"    ... and {len(files) - limit} more (--json lists all)")
    lines += [f"note: {note}" for note in result["notes"]]
    lines.append(f"{result['errors']} error(s), {result['warnings']} warning(s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import json

    result = check(args.data, csv=args.csv, heatmaps=args.heatmaps)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 1 if result["errors"] else 0
