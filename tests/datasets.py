"""Tiny synthetic data sets for tests, in both layouts that `training.data.discover` reads.

Every image is a noisy grey field with one square "region", the bottom-right quarter (the part a
human map marks; off-centre so that even a 2x2 CAM grid sees it, and apart from the decoy corner). Real images have a dark region, fake images a bright one, so even a tiny network learns the
difference in a few steps, and the evidence lies inside the annotated region. A `decoy` corner cue
(outside the region) can be added: "agree" makes it follow the label (a spurious shortcut, for
training), "random" makes it independent of the label (for testing), "none" leaves it out.

    from tests.datasets import make_plain_dataset, make_csv_dataset
    root = make_plain_dataset(tmp_path, n_real=8, n_fake=8, size=32)
    data_root, csv_path, heatmaps = make_csv_dataset(tmp_path)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

# The annotated region and the decoy corner, as fractions of the side: (top, left, bottom, right).
REGION = (0.5, 0.5, 1.0, 1.0)
DECOY_CORNER = (0.0, 0.0, 0.25, 0.25)
DECOY_MODES = ("none", "agree", "random")


def _box(size: int, box: tuple[float, float, float, float]) -> tuple[slice, slice]:
    top, left, bottom, right = (round(f * size) for f in box)
    return slice(top, bottom), slice(left, right)


def make_face_image(label: int, size: int, rng: np.random.Generator, decoy: str = "none") -> Image.Image:
    """One RGB image of `size` x `size`: label 0 (real) has a dark region, 1 (fake) a bright one."""
    if decoy not in DECOY_MODES:
        raise ValueError(f"decoy {decoy!r}: one of {DECOY_MODES}")
    pixels = rng.normal(128.0, 20.0, size=(size, size, 3)) + rng.uniform(-20, 20, size=3)
    rows, cols = _box(size, REGION)
    pixels[rows, cols] = (200.0 if label else 55.0) + rng.normal(0.0, 15.0, size=pixels[rows, cols].shape)
    if decoy != "none":
        cue = label if decoy == "agree" else int(rng.integers(0, 2))
        rows, cols = _box(size, DECOY_CORNER)
        pixels[rows, cols] = 240.0 if cue else 15.0
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), mode="RGB")


def make_region_map(size: int, blur: bool = True) -> Image.Image:
    """A grayscale (mode "L") human-style map of `size` x `size`: 255 on REGION, 0 elsewhere, softened."""
    array = np.zeros((size, size), dtype=np.uint8)
    array[_box(size, REGION)] = 255
    image = Image.fromarray(array, mode="L")
    return image.filter(ImageFilter.GaussianBlur(max(size / 32.0, 0.5))) if blur else image


def _write_class(
    folder: Path,
    maps_dir: Path | None,
    label: int,
    count: int,
    size: int,
    rng: np.random.Generator,
    prefix: str,
    sources: Sequence[str] | None,
    decoy: str,
) -> list[Path]:
    """Write `count` images of one class (round-robin over `sources` sub-folders) and their maps."""
    written = []
    region_map = make_region_map(size) if maps_dir is not None else None
    for i in range(count):
        target = folder / sources[i % len(sources)] if sources else folder
        target.mkdir(parents=True, exist_ok=True)
        path = target / f"{prefix}_{i:03d}.png"
        make_face_image(label, size, rng, decoy).save(path)
        if region_map is not None:
            maps_dir.mkdir(parents=True, exist_ok=True)
            region_map.save(maps_dir / path.name)
        written.append(path)
    return written


def make_plain_dataset(
    root: str | Path,
    n_real: int = 8,
    n_fake: int = 8,
    size: int = 32,
    maps: bool = True,
    sources: Sequence[str] | None = None,
    seed: int = 0,
    real_sources: Sequence[str] | None = None,
    decoy: str = "none",
    split: str | None = None,
) -> Path:
    """Write DATA/real/, DATA/fake/ (and DATA/maps/ when `maps`) under `root`; return DATA.

    `sources` puts the fake images round-robin into sub-folders fake/<source>/ (generators);
    `real_sources` does the same for real/. With `split` ("train", "val", "test") the plain layout
    goes into DATA/<split>/ instead (call once per split with the same root and distinct seeds);
    file names carry the split so they never clash between splits.
    """
    data = Path(root) / "data"
    base = data / split if split else data
    rng = np.random.default_rng(seed)
    maps_dir = base / "maps" if maps else None
    tag = f"{split}_" if split else ""
    _write_class(base / "real", maps_dir, 0, n_real, size, rng, f"{tag}real", real_sources, decoy)
    _write_class(base / "fake", maps_dir, 1, n_fake, size, rng, f"{tag}fake", sources, decoy)
    return data


def make_csv_dataset(
    root: str | Path,
    n_real: int = 8,
    n_fake: int = 8,
    n_test_real: int = 4,
    n_test_fake: int = 4,
    n_val_real: int = 0,
    n_val_fake: int = 0,
    size: int = 32,
    maps: bool = True,
    sources: Sequence[str] | None = None,
    header: bool = False,
    class_names: tuple[str, str] = ("Real", "Synthetic"),
    seed: int = 0,
    decoy: str = "none",
    test_decoy: str = "random",
) -> tuple[Path, Path, Path]:
    """The authors' layout under `root`: return (data_root, csv_path, heatmaps_dir).

    Images lie in data_root/<split>/original_data/0_real/ and 1_fake/ (plus /<source>/ for fakes
    when `sources` is given, which also fills the CSV's 4th column); CSV rows are
    `split,class,/<split>/original_data/...` with a leading "/" as in the authors' file; maps for
    every image (all splits) lie flat in heatmaps_dir, matched by file name. `decoy` applies to the
    train and val splits, `test_decoy` to the test split.
    """
    root = Path(root)
    data_root = root / "csv_data"
    heatmaps = root / "heatmaps"
    heatmaps.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = [["split", "class", "path", "source"]] if header else []
    plan = [("train", n_real, n_fake), ("validation", n_val_real, n_val_fake), ("test", n_test_real, n_test_fake)]
    for split, count_real, count_fake in plan:
        split_decoy = test_decoy if split == "test" else decoy
        for label, count, folder in ((0, count_real, "0_real"), (1, count_fake, "1_fake")):
            class_sources = sources if label == 1 else None
            paths = _write_class(
                data_root / split / "original_data" / folder,
                heatmaps if maps else None,
                label,
                count,
                size,
                rng,
                f"p_{split}_{'fake' if label else 'real'}",
                class_sources,
                split_decoy,
            )
            for path in paths:
                relative = "/" + path.relative_to(data_root).as_posix()
                source = path.parent.name if class_sources else ""
                row = [split, class_names[label], relative]
                rows.append(row + [source] if (sources or header) else row)
    csv_path = root / "data.csv"
    csv_path.write_text("".join(",".join(row) + "\n" for row in rows))
    return data_root, csv_path, heatmaps


def corrupt(path: str | Path) -> Path:
    """Overwrite a file with bytes that no image decoder accepts; return its path."""
    Path(path).write_bytes(b"this is not an image\n")
    return Path(path)
