"""`cyborg saliency prior DATA --out MAPS_DIR`: proxy saliency maps for data without human maps.

Writes one grayscale PNG per image (the image's stem + .png, the image's own size) holding a
face-part template for FFHQ-aligned faces, and MAPS_DIR/PROVENANCE.json, so every run that trains on
them records `saliency: proxy`. Refuses to write into a folder of human maps.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="plain-layout folder, or the root the CSV's paths hang from")
    parser.add_argument("--csv", metavar="FILE", help="the authors' CSV (split,class,path[,source])")
    parser.add_argument("--out", metavar="MAPS_DIR", required=True, help="folder for the proxy maps")
    parser.add_argument("--method", default="ffhq-face-parts", choices=["ffhq-face-parts"], help="how maps are made")
    parser.add_argument("--size", type=int, metavar="N", help="write N x N maps instead of each image's own size")


def run(args: argparse.Namespace) -> int:
    import io
    from pathlib import Path

    from PIL import Image

    from core import __version__
    from core.errors import UserError
    from core.contract import utc_now
    from training.data import MapIndex, discover, name_list
    from training.saliency import FFHQ_FACE_PARTS, PROVENANCE_FILE, face_part_template, proxy_map_name, read_provenance, to_png_image, write_provenance

    samples = discover(args.data, csv=args.csv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and len(MapIndex(out)) and read_provenance(out) is None:
        raise UserError(f"--out {out}: holds maps without {PROVENANCE_FILE} (human maps?); choose an empty folder")
    if args.size is not None and args.size < 8:
        raise UserError(f"--size {args.size}: at least 8")
    out.mkdir(parents=True, exist_ok=True)
    templates: dict[tuple[int, int], bytes] = {}  # PNG bytes, encoded once per size
    written: dict[str, Path] = {}
    unreadable = []
    for sample in samples:
        name = proxy_map_name(sample.path)
        if name in written:
            log.debug("%s: map %s already written for %s", sample.path, name, written[name])
            continue
        try:
            with Image.open(sample.path) as image:
                width, height = image.size
        except (OSError, SyntaxError, ValueError):
            unreadable.append(str(sample.path))
            continue
        if args.size is not None:
            width = height = args.size
        if (height, width) not in templates:
            buffer = io.BytesIO()
            to_png_image(face_part_template(height, width)).save(buffer, format="PNG")
            templates[(height, width)] = buffer.getvalue()
        (out / name).write_bytes(templates[(height, width)])
        written[name] = sample.path
    write_provenance(
        out,
        args.method,
        description="face-part template (eyes, nose, mouth) at FFHQ's canonical landmark positions; not human annotations",
        parts=FFHQ_FACE_PARTS,
        data=str(Path(args.data).resolve()),
        csv=str(Path(args.csv).resolve()) if args.csv else None,
        count=len(written),
        created=utc_now(),
        cyborg=__version__,
    )
    print(f"wrote {len(written)} proxy maps ({args.method}) and PROVENANCE.json to {out}")
    if unreadable:
        print(f"skipped {len(unreadable)} unreadable image(s): {name_list(unreadable)}")
        return 1
    return 0
