"""`cyborg data align SRC OUT [--size 256] [--min-face 64] [--max-faces N]`: photos -> aligned face crops.

Every face found in the photos under SRC (a folder, searched recursively, or one image) is cut in
FFHQ's alignment (core/faces.py, the same geometry the server uses) at --size pixels from the
original pixels and written to OUT as `<relative path>_<index>.png`, keeping SRC's sub-folders
(so `SRC/real/...` lands in `OUT/real/...`, ready for `cyborg train`). Faces whose aligned square
is under --min-face pixels are skipped. A summary line says how many photos, faces and skips.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="a folder of photos (searched recursively) or one image")
    parser.add_argument("out", metavar="OUT", help="folder for the aligned crops (created)")
    parser.add_argument("--size", type=int, default=256, help="side of the aligned crops in pixels (default: 256, the FFHQ-aligned sets' size)")
    parser.add_argument("--min-face", type=int, default=64, help="skip faces whose aligned square is under this many pixels (default: 64)")
    parser.add_argument("--max-faces", type=int, default=0, help="at most this many faces a photo, largest first (default: 0 = all)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from core.errors import ImageError, UserError
    from core.faces import align
    from core.images import IMAGE_EXTENSIONS, read_image
    from engines.faces import FaceDetector

    source, out = Path(args.source), Path(args.out)
    if args.size < 16 or args.min_face < 1 or args.max_faces < 0:
        raise UserError("--size is at least 16, --min-face at least 1, --max-faces 0 (all) or more")
    if source.is_file():
        photos, root = [source], source.parent
    elif source.is_dir():
        photos, root = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS), source
    else:
        raise UserError(f"{source}: no such folder or image")
    detector = FaceDetector()
    written = small = failed = 0
    for photo in photos:
        try:
            image = read_image(photo)
        except ImageError as error:
            print(f"cyborg data align: skipping {error}")
            failed += 1
            continue
        faces = sorted(detector.detect(image), key=lambda face: -face.size)
        kept = [face for face in faces if face.size >= args.min_face]
        small += len(faces) - len(kept)
        if args.max_faces:
            kept = kept[: args.max_faces]
        target = out / photo.relative_to(root).parent
        target.mkdir(parents=True, exist_ok=True)
        for index, face in enumerate(kept):
            align(image, face.landmarks, args.size).save(target / f"{photo.stem}_{index}.png")
            written += 1
    print(f"{len(photos)} photos, {written} aligned faces written to {out}, {small} under --min-face, {failed} unreadable")
    return 1 if failed else 0
