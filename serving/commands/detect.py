"""`cyborg detect IMAGE...`: send images to a server and print scores (a table or JSON lines).

Each image is reported on its own: an unreadable or undecodable file gets its own error line and
the command exits 1 once every image has been tried. With --heatmap DIR, the CAM overlay of each
image is written there as `<name>.cam.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_SERVER = "localhost:8001"
CHUNK_IMAGES = 16  # images per DetectBatch call
CHUNK_BYTES = 16 * 1024 * 1024  # and at most this many image bytes per call
FATAL = ("UNAVAILABLE", "UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED")  # the server, not an image


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, BMP, ...)")
    parser.add_argument("--server", default=os.environ.get("CYBORG_SERVER", DEFAULT_SERVER),
                        help=f"HOST:PORT of the server (default: $CYBORG_SERVER or {DEFAULT_SERVER})")  # fmt: skip
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--version", type=int, default=0, help="model version (default: the latest)")
    parser.add_argument("--operating-point", default="", metavar="NAME|NUMBER",
                        help="the threshold that decides the label: a name the model records (eer, fpr1, fpr5) or a "
                             "threshold in [0, 1] on the calibrated probability (default: the model's default)")
    parser.add_argument("--heatmap", type=Path, metavar="DIR", help="write each image's CAM overlay PNG into DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object a line instead of a table")
    parser.add_argument("--tls-ca", type=Path, metavar="FILE", help="CA certificate (PEM): connect with TLS")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE", help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="client private key (PEM) for mutual TLS")
    parser.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the bearer token")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call (default: 60)")


def run(args: argparse.Namespace) -> int:
    from core.errors import UserError
    from serving.client import DetectorClient

    if args.version < 0:
        raise UserError(f"--version {args.version}: a positive version, or 0 for the latest")
    for flag in ("tls_ca", "tls_cert", "tls_key", "token_file"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise UserError(f"--{flag.replace('_', '-')} {path}: no such file")
    check_operating_point(args.operating_point)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together (mutual TLS)")
    token = read_token(args.token_file) if args.token_file else None
    if args.heatmap:
        args.heatmap.mkdir(parents=True, exist_ok=True)

    printer = JsonPrinter() if args.json else TablePrinter()
    outputs = HeatmapNames(args.heatmap) if args.heatmap else None
    heatmap = "overlay" if args.heatmap else "none"
    client = DetectorClient(args.server, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, token=token, timeout=args.timeout)
    with client:
        try:
            failures = send(client, args, printer, outputs, heatmap)
        finally:
            printer.finish()
    return 1 if failures else 0


def send(client, args: argparse.Namespace, printer, outputs: HeatmapNames | None, heatmap: str) -> int:
    """Score every image in chunks, reporting each as it completes; returns the failure count."""
    from core.errors import UserError
    from serving.client import ClientError, DetectionError

    failures = 0
    for chunk in chunks(args.images):
        outcomes: dict[int, object] = {}
        data: dict[int, bytes] = {}
        for index, name in enumerate(chunk):
            try:
                data[index] = Path(name).read_bytes()
            except OSError as error:
                outcomes[index] = DetectionError(name, "NOT_FOUND", f"{name}: cannot read ({error.strerror})")
        if data:
            options = {"model": args.model, "version": args.version, "heatmap": heatmap, "operating_point": args.operating_point}
            try:
                try:
                    results = client.detect_batch(list(data.values()), **options)
                except ClientError as error:
                    if error.code.name in FATAL:
                        raise
                    results = [one_by_one(client, item, options) for item in data.values()]  # e.g. over the size limit
            except ClientError as error:
                raise UserError(f"--server {args.server}: {error}") from error
            outcomes.update(zip(data, results))
        for index, name in enumerate(chunk):
            result = outcomes[index]
            result.image = name
            if isinstance(result, DetectionError) and result.message.startswith("operating point"):
                raise UserError(f"--operating-point: {result.message}")  # the choice, not the image, is wrong
            if isinstance(result, DetectionError):
                failures += 1
                printer.error(result)
                continue
            written = None
            if outputs is not None and result.heatmap_png:
                written = outputs.path_for(name)
                written.write_bytes(result.heatmap_png)
            printer.result(result, written)
    return failures


def one_by_one(client, data: bytes, options: dict):
    """Detect one image alone; its failure becomes a DetectionError."""
    from serving.client import ClientError, DetectionError

    try:
        return client.detect(data, **options)
    except ClientError as error:
        if error.code.name in FATAL:
            raise
        return DetectionError("", error.code.name, str(error).partition(": ")[2])


def check_operating_point(choice: str) -> None:
    """Refuse a number outside [0, 1] before sending anything (names are checked by the server)."""
    from core.errors import UserError

    try:
        value = float(choice)
    except ValueError:
        return
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--operating-point {choice}: a threshold must be a number in [0, 1]")


def read_token(path: Path) -> str:
    from core.errors import UserError

    token = path.read_text().strip()
    if not token:
        raise UserError(f"--token-file {path}: empty")
    return token


def chunks(names: list[str]):
    """Groups of at most CHUNK_IMAGES files and about CHUNK_BYTES bytes (one file may exceed it alone)."""
    group, size = [], 0
    for name in names:
        try:
            length = os.path.getsize(name)
        except OSError:
            length = 0
        if group and (len(group) >= CHUNK_IMAGES or size + length > CHUNK_BYTES):
            yield group
            group, size = [], 0
        group.append(name)
        size += length
    if group:
        yield group


class HeatmapNames:
    """`<stem>.cam.png` in the folder, with a numeric suffix when two images share a stem."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.used: set[str] = set()

    def path_for(self, image: str) -> Path:
        stem = Path(image).stem or "image"
        name, index = f"{stem}.cam.png", 1
        while name in self.used:
            index += 1
            name = f"{stem}-{index}.cam.png"
        self.used.add(name)
        return self.folder / name


class JsonPrinter:
    def result(self, result, heatmap: Path | None) -> None:
        data = result.to_dict()
        data.pop("timings_ms", None)
        if heatmap is not None:
            data["heatmap"] = str(heatmap)
        print(json.dumps(data), flush=True)

    def error(self, error) -> None:
        print(json.dumps(error.to_dict()), flush=True)

    def finish(self) -> None:
        pass


class TablePrinter:
    """Rows collected, then printed with aligned columns; errors also go to stderr."""

    HEADER = ("image", "score", "probability", "label", "point", "model", "version", "heatmap")

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def result(self, result, heatmap: Path | None) -> None:
        row = (result.image, f"{result.score:.4f}", f"{result.probability:.4f}", result.label, result.operating_point, result.model,
               str(result.version), str(heatmap or ""))  # fmt: skip
        self.rows.append(row)

    def error(self, error) -> None:
        self.rows.append((error.image, "-", "-", "error", "", error.message, "", ""))
        print(f"cyborg detect: {error.image}: {error.message}", file=sys.stderr)

    def finish(self) -> None:
        columns = self.HEADER if any(row[-1] for row in self.rows) else self.HEADER[:-1]
        rows = [row[: len(columns)] for row in self.rows]
        widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
        for row in [columns, *rows]:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
