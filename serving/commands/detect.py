"""`cyborg detect IMAGE...`: send images to a server and print scores (a table or JSON lines).

Each image is reported on its own: an unreadable or undecodable file gets its own error line and
the command exits 1 once every image has been tried. Photos (`--input-kind auto`, the default, or
`photo`) get a row per face (box, score, label) or a `no_face` row. With --heatmap DIR, the CAM
overlay of each image is written there as `<name>.cam.png`, with every face's box and score drawn.
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
    parser.add_argument("--input-kind", choices=("auto", "photo", "aligned"), default="auto",
                        help="auto (default): find faces, and score a picture that is one face filling the frame whole; photo: "
                             "score every face; aligned: score the picture whole as an aligned face crop")
    parser.add_argument("--heatmap", type=Path, metavar="DIR", help="write each image's CAM overlay PNG (with face boxes) into DIR")
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
            options = {"model": args.model, "version": args.version, "heatmap": heatmap, "operating_point": args.operating_point,
                       "input_kind": args.input_kind}  # fmt: skip
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
                written.write_bytes(draw_faces(result.heatmap_png, result, data[index]) if result.faces else result.heatmap_png)
            printer.result(result, written)
    return failures


def draw_faces(png: bytes, result, photo: bytes) -> bytes:
    """The overlay PNG with each face's box (red: fake, green: real, grey: not scored), its index and
    probability drawn. The server draws the overlay at most --max-heatmap-side pixels long, so boxes
    (in the photo's own upright pixels, read from `photo`'s header) are scaled to it."""
    import io

    from PIL import Image, ImageDraw

    picture = Image.open(io.BytesIO(png)).convert("RGB")
    with Image.open(io.BytesIO(photo)) as original:
        width = original.height if original.getexif().get(0x0112, 1) in (5, 6, 7, 8) else original.width
    scale = picture.width / width
    draw = ImageDraw.Draw(picture)
    for index, face in enumerate(result.faces):
        box = [v * scale for v in face["box"]]
        colour = {"fake": (230, 30, 30), "real": (30, 200, 60)}.get(face["label"], (160, 160, 160))
        draw.rectangle(box, outline=colour, width=max(2, round(picture.width / 400)))
        text = f"{index} {face['probability']:.2f} {face['label']}" if face["status"] == "scored" else f"{index} {face['status']}"
        draw.text((box[0] + 2, max(0, box[1] - 12)), text, fill=colour)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


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
    """Rows collected, then printed with aligned columns; errors also go to stderr. A photo gets a
    row per face (`face` its index, `box` left,top,right,bottom in the photo's pixels; the verdict
    face marked `*`); a picture scored whole has `face` and `box` empty."""

    HEADER = ("image", "face", "box", "score", "probability", "label", "point", "model", "version", "heatmap")

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def result(self, result, heatmap: Path | None) -> None:
        common = (result.operating_point, result.model, str(result.version), str(heatmap or ""))
        if result.input_kind != "photo":
            self.rows.append((result.image, "", "", f"{result.score:.4f}", f"{result.probability:.4f}", result.label, *common))
            return
        if not result.faces:
            self.rows.append((result.image, "-", "", "-", "-", "no_face", *common))
        for index, face in enumerate(result.faces):
            box = ",".join(str(round(v)) for v in face["box"])
            mark = "*" if index == result.verdict_face else ""
            if face["status"] == "scored":
                self.rows.append((result.image, f"{index}{mark}", box, f"{face['score']:.4f}", f"{face['probability']:.4f}", face["label"], *common))
            else:
                self.rows.append((result.image, str(index), box, "-", "-", face["status"], *common))

    def error(self, error) -> None:
        self.rows.append((error.image, "", "", "-", "-", "error", "", error.message, "", ""))
        print(f"cyborg detect: {error.image}: {error.message}", file=sys.stderr)

    def finish(self) -> None:
        keep = [i for i, name in enumerate(self.HEADER) if name not in ("face", "box", "heatmap") or any(row[i] for row in self.rows)]
        columns = [self.HEADER[i] for i in keep]  # face, box and heatmap only when some row has them
        rows = [[row[i] for i in keep] for row in self.rows]
        widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
        for row in [columns, *rows]:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
