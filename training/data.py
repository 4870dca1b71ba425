"""Training data: both layouts -> samples (image path, label, split, source, map path) -> tensors.

Two layouts are read by `discover`:

- the authors' CSV: rows `split,class,path[,source]` (optional header), the path appended to the data
  root (a leading "/" is allowed), heatmaps matched by file name in a separate folder;
- a plain folder: DATA/real/ and DATA/fake/ (sub-folders are sources, e.g. generators), optional
  DATA/maps/ with the same file names; or DATA/train/, DATA/val/, DATA/test/ each laid out that way.

`split_samples` holds a seeded, label-stratified validation set out of the training split when the
data has none. `FaceDataset` prepares images through `core.images` (exactly as the server does)
and maps through `training.saliency.prepare_map`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from core.errors import UserError
from core.contract import CLASS_NAMES, FAKE_INDEX, LEGACY_SCALE, REAL_INDEX
from core.images import crop_box, is_image_file, read_image, scale_to, scaled_size, to_chw, to_model_input
from training.saliency import load_map, prepare_map, read_provenance

if TYPE_CHECKING:
    from training.augment import Augmenter

log = logging.getLogger(__name__)

LABELS = {name: index for index, name in enumerate(CLASS_NAMES)}  # {"real": 0, "fake": 1}
# Class names accepted in a CSV (any case): the authors write Real / Synthetic.
CSV_CLASS_NAMES = {"real": REAL_INDEX, "synthetic": FAKE_INDEX, "fake": FAKE_INDEX}
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
MAPS_FOLDER = "maps"
MAX_NAMED = 5  # how many file names an error message lists


@dataclasses.dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 real, 1 fake (core.contract.CLASS_NAMES order)
    split: str  # "train" | "val" | "test"
    source: str  # generator / collection, for per-source evaluation
    map_path: Path | None = None


def name_list(items: Sequence[object], limit: int = MAX_NAMED) -> str:
    """'a, b, c (and 7 more)': at most `limit` items named."""
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


class MapIndex:
    """The map files of a folder (recursively), found by the image's file name, else by its stem
    (so proxy maps written as PNG match JPEG images); the first in sorted order wins a clash."""

    def __init__(self, folder: Path | None):
        self.by_name: dict[str, Path] = {}
        self.by_stem: dict[str, Path] = {}
        for path in sorted(folder.rglob("*")) if folder is not None else ():
            if is_image_file(path):
                self.by_name.setdefault(path.name, path)
                self.by_stem.setdefault(path.stem, path)

    def __len__(self) -> int:
        return len(self.by_name)

    def find(self, image_path: Path) -> Path | None:
        return self.by_name.get(image_path.name) or self.by_stem.get(image_path.stem)


def parse_class(value: str, where: str) -> int:
    label = CSV_CLASS_NAMES.get(value.strip().lower())
    if label is None:
        valid = ", ".join(name.capitalize() for name in CSV_CLASS_NAMES)
        raise UserError(f"{where}: unknown class {value.strip()!r}; valid classes (any case): {valid}")
    return label


def parse_split(value: str, where: str) -> str:
    split = SPLIT_ALIASES.get(value.strip().lower())
    if split is None:
        raise UserError(f"{where}: unknown split {value.strip()!r}; valid splits (any case): {', '.join(SPLIT_ALIASES)}")
    return split


def read_csv(data: Path, csv_path: Path, heatmaps: Path | None) -> list[Sample]:
    """Samples from the authors' CSV layout (paths are not checked here; see FaceDataset and data check)."""
    try:
        with open(csv_path, newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError as error:
        raise UserError(f"--csv {csv_path}: cannot read ({error.strerror})") from error
    maps = MapIndex(heatmaps)
    samples = []
    for number, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        where = f"{csv_path}:{number}"
        if number == 1 and cells[0].lower() == "split":
            continue  # header
        if len(cells) not in (3, 4) or not cells[2]:
            raise UserError(f"{where}: expected 'split,class,path[,source]', got {','.join(row)!r}")
        split, label = parse_split(cells[0], where), parse_class(cells[1], where)
        path = data / cells[2].replace("\\", "/").lstrip("/")
        source = cells[3] if len(cells) == 4 and cells[3] else path.parent.name
        samples.append(Sample(path, label, split, source, maps.find(path)))
    return samples


def read_plain(folder: Path, split: str, maps: MapIndex) -> list[Sample]:
    """Samples from folder/real/ and folder/fake/; sub-folders name the source."""
    samples = []
    for name, label in LABELS.items():
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.rglob("*")):
            if not is_image_file(path):
                continue
            relative = path.relative_to(class_dir).parts
            source = relative[0] if len(relative) > 1 else name
            samples.append(Sample(path, label, split, source, maps.find(path)))
    return samples


def discover(
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    csv: str | os.PathLike[str] | None = None,
    heatmaps: str | os.PathLike[str] | None = None,
) -> list[Sample]:
    """Every sample of one data folder, or of several plain-layout folders at once (their sources
    named FOLDER/SOURCE, so per-source figures tell them apart); UserError naming what is wrong."""
    folders = data_folders(data)
    if len(folders) == 1:
        return discover_one(folders[0], csv, heatmaps)
    if csv is not None:
        raise UserError("--csv describes one data root; several DATA folders must each have the plain layout")
    names = [Path(folder).name for folder in folders]
    if len(set(names)) != len(names):
        raise UserError(f"DATA folders must have different names (they name the sources): {', '.join(map(str, folders))}")
    samples = []
    for folder, name in zip(folders, names):
        samples += [dataclasses.replace(s, source=f"{name}/{s.source}") for s in discover_one(folder, None, heatmaps)]
    return samples


def data_folders(data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """TrainConfig.data (one folder or a list of them) as a list."""
    return [os.fspath(data)] if isinstance(data, (str, os.PathLike)) else [os.fspath(d) for d in data]


def discover_one(
    data: str | os.PathLike[str],
    csv: str | os.PathLike[str] | None = None,
    heatmaps: str | os.PathLike[str] | None = None,
) -> list[Sample]:
    """Every sample of one data folder in either layout; UserError when the layout is not recognised."""
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"{data}: data folder not found")
    heatmaps_dir = Path(heatmaps) if heatmaps is not None else None
    if heatmaps_dir is not None and not heatmaps_dir.is_dir():
        raise UserError(f"--heatmaps {heatmaps_dir}: folder not found")
    if csv is not None:
        samples = read_csv(data, Path(csv), heatmaps_dir)
        if not samples:
            raise UserError(f"--csv {csv}: no rows")
        return samples
    split_dirs = {SPLIT_ALIASES[p.name.lower()]: p for p in sorted(data.iterdir()) if p.is_dir() and p.name.lower() in SPLIT_ALIASES}
    if split_dirs and any((data / name).is_dir() for name in LABELS):
        raise UserError(f"{data}: holds both split folders ({', '.join(p.name for p in split_dirs.values())}) and real/ or fake/; use one layout")
    folders = split_dirs if split_dirs else {"train": data}
    samples = []
    for split, folder in folders.items():
        maps_dir = heatmaps_dir or (folder / MAPS_FOLDER if (folder / MAPS_FOLDER).is_dir() else None)
        samples += read_plain(folder, split, MapIndex(maps_dir))
    if not samples:
        raise UserError(
            f"{data}: no images found; expected real/ and fake/ folders (optionally inside train/, val/, test/), "
            "or the authors' layout with --csv FILE"
        )
    return samples


def split_samples(samples: Iterable[Sample], val_fraction: float, seed: int) -> dict[str, list[Sample]]:
    """{"train", "val", "test"} lists. Explicit val samples are kept; otherwise a seeded hold-out of
    `val_fraction` of each (label, source) group of training samples becomes val, so every source is
    represented in validation (deterministic, input order irrelevant; a group's hold-out does not change
    when other sources are added, so a model trained without one source is validated on the same images).
    """
    samples = sorted(samples, key=lambda s: (SPLITS.index(s.split), s.label, str(s.path)))
    splits: dict[str, list[Sample]] = {name: [s for s in samples if s.split == name] for name in SPLITS}
    if splits["val"] or val_fraction <= 0:
        return splits
    train, val = [], []
    groups = sorted({(s.label, s.source) for s in splits["train"]})
    for label, source in groups:
        group = [s for s in splits["train"] if s.label == label and s.source == source]
        random.Random(f"{seed}:{label}:{source}").shuffle(group)  # one stream per group: adding a source moves no other
        count = min(len(group) - 1, max(1, round(len(group) * val_fraction))) if len(group) > 1 else 0
        val += [dataclasses.replace(s, split="val") for s in group[:count]]
        train += group[count:]
    order = lambda s: (s.label, str(s.path))  # noqa: E731
    splits["train"], splits["val"] = sorted(train, key=order), sorted(val, key=order)
    return splits


def check_opens(path: Path) -> str | None:
    """None if PIL can read the file's header, else the reason."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018  (header parsed by open)
    except FileNotFoundError:
        return "missing"
    except (OSError, SyntaxError, ValueError) as error:
        return f"unreadable ({error})"
    return None


def sample_problem(sample: Sample) -> str | None:
    """None if the image and its map (if any) open, else what is wrong."""
    reason = check_opens(sample.path)
    if reason is None and sample.map_path is not None:
        map_reason = check_opens(sample.map_path)
        reason = f"map {sample.map_path} {map_reason}" if map_reason else None
    return reason


class FaceDataset(torch.utils.data.Dataset):
    """Samples as model inputs: uint8 [3, H, W] images, labels and maps on the CAM grid.

    Images are prepared as serving prepares them (`core.images.to_model_input` with `scale`). With
    `train=True`, the crop is taken at a random place instead of the centre and `augmenter` (if any)
    changes the scaled image first; the saliency map follows every geometric change. Randomness
    depends only on (seed, epoch, index): items are addressed as `epoch * len(dataset) + index`
    (see `EpochSampler`), so a resumed run and worker processes see the same images. With
    `teacher_view` (training with an augmenter), items also carry "teacher_image": the same framing and
    crop without the everyday changes of the pixels (`--distill-view clean`).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int | tuple[int, int],
        cam_grid: tuple[int, int],
        skip_unreadable: bool = False,
        scale: int = LEGACY_SCALE,
        train: bool = False,
        augmenter: Augmenter | None = None,
        seed: int = 0,
        teacher_view: bool = False,
    ):
        self.height, self.width = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.cam_grid = (int(cam_grid[0]), int(cam_grid[1]))
        self.scale, self.train, self.augmenter, self.seed = int(scale or LEGACY_SCALE), train, augmenter, seed
        self.teacher_view = teacher_view and train and augmenter is not None
        with ThreadPoolExecutor(max_workers=8) as pool:  # header reads: I/O bound
            reasons = list(pool.map(sample_problem, samples))
        problems = [f"{sample.path} ({reason})" for sample, reason in zip(samples, reasons) if reason]
        kept = [sample for sample, reason in zip(samples, reasons) if not reason]
        refuse_or_skip(problems, "unreadable image(s) or map(s):", skip_unreadable)
        if not kept:
            raise UserError("no usable images")
        self.samples = kept
        self.prepared_maps: dict[Path, torch.Tensor] = {}  # map path -> [h, w]; proxy maps repeat

    def __len__(self) -> int:
        return len(self.samples)

    def rebuilt(self, samples: Sequence[Sample], train: bool | None = None, teacher_view: bool | None = None) -> FaceDataset:
        """The same preparation over other samples (`train=False`: as validation prepares them;
        `teacher_view=False`: without the teacher's clean view)."""
        train = self.train if train is None else train
        teacher_view = self.teacher_view if teacher_view is None else teacher_view
        return FaceDataset(samples, (self.height, self.width), self.cam_grid, scale=self.scale, train=train,
                           augmenter=self.augmenter if train else None, seed=self.seed,
                           teacher_view=teacher_view and train)  # fmt: skip

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        epoch, index = divmod(int(item), len(self.samples))
        sample = self.samples[index]
        image = read_image(sample.path)  # ImageError names the file
        whole = self.scale == LEGACY_SCALE or scaled_size(image.size, self.scale) == (self.width, self.height)
        views = {}
        if whole and not (self.train and self.augmenter is not None):
            pixels, saliency = self.untouched(image, sample)
        else:
            pixels, saliency, views = self.transformed(image, sample, random.Random(f"{self.seed}:{epoch}:{index}"))
        return {
            "image": torch.from_numpy(pixels),
            **{name: torch.from_numpy(view) for name, view in views.items()},
            "label": torch.tensor(sample.label, dtype=torch.long),
            "saliency": saliency,
            "has_saliency": torch.tensor(sample.map_path is not None),
            "index": torch.tensor(index, dtype=torch.long),
        }

    def untouched(self, image: Image.Image, sample: Sample) -> tuple[np.ndarray, torch.Tensor]:
        """The whole image is the input (legacy resize, or already at the input size): maps are cached."""
        pixels = to_model_input(image, self.height, self.width, self.scale)
        if sample.map_path is None:
            return pixels, torch.zeros(self.cam_grid, dtype=torch.float32)
        if sample.map_path not in self.prepared_maps:
            self.prepared_maps[sample.map_path] = torch.from_numpy(prepare_map(sample.map_path, self.cam_grid))
        return pixels, self.prepared_maps[sample.map_path].clone()

    def transformed(self, image: Image.Image, sample: Sample,
                    rng: random.Random) -> tuple[np.ndarray, torch.Tensor, dict[str, np.ndarray]]:  # fmt: skip
        """Scale, (augment,) crop; the map at the scaled image's size goes through the same steps.
        The dict holds "teacher_image" with `teacher_view`: the framed image, cropped alike."""
        image = scale_to(image, self.scale)
        saliency = None
        if sample.map_path is not None:
            full = Image.fromarray(load_map(sample.map_path), mode="F").resize(image.size, Image.Resampling.BILINEAR)
            saliency = np.asarray(full, dtype=np.float32)
        framed = None
        if self.train and self.augmenter is not None:
            image, saliency = self.augmenter.frame(image, saliency, rng)
            framed = image
            image = self.augmenter.degrade(image, rng)
        if self.train:
            left, top = rng.randint(0, image.width - self.width), rng.randint(0, image.height - self.height)
            box = crop_box(image.size, self.height, self.width, left, top)
        else:
            box = crop_box(image.size, self.height, self.width)
        pixels = to_chw(image.crop(box))
        views = {"teacher_image": to_chw(framed.crop(box))} if self.teacher_view else {}
        if saliency is None:
            return pixels, torch.zeros(self.cam_grid, dtype=torch.float32), views
        cropped = saliency[box[1]:box[3], box[0]:box[2]]
        return pixels, torch.from_numpy(prepare_map(cropped, self.cam_grid)), views


class EpochSampler(torch.utils.data.Sampler[int]):
    """A sampler's indices offset by `epoch * len(dataset)`, so FaceDataset knows the epoch of each
    item even in persistent worker processes (which never see attribute changes made after they start)."""

    def __init__(self, sampler: torch.utils.data.Sampler[int], size: int):
        self.sampler, self.size, self.epoch = sampler, size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.size
        return (offset + index for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def refuse_or_skip(problems: Sequence[str], what: str, skip_unreadable: bool) -> None:
    """UserError naming the unusable samples, or (with --skip-unreadable) a warning that they are skipped."""
    if not problems:
        return
    summary = f"{len(problems)} {what} {name_list(problems)}"
    if not skip_unreadable:
        raise UserError(f"{summary}; fix or remove them, or pass --skip-unreadable")
    log.warning("skipping %s", summary)


class _DecodeCheck(torch.utils.data.Dataset):
    """Items of `dataset` reduced to "" (decodes) or the error message naming the file."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str:
        try:
            self.dataset[index]
        except UserError as error:  # ImageError / MapError name the file
            return str(error)
        return ""


def decode_all(dataset: FaceDataset, workers: int, skip_unreadable: bool) -> FaceDataset:
    """Decode every image and map once, so a file whose header opens but whose data is truncated never
    stops a run mid-epoch (FaceDataset itself only opens headers). Returns the dataset, rebuilt without
    the bad samples under --skip-unreadable; UserError otherwise."""
    loader = torch.utils.data.DataLoader(_DecodeCheck(dataset), batch_size=64, num_workers=workers, collate_fn=list)
    results = [message for batch in loader for message in batch]
    problems = [message for message in results if message]
    if not problems:
        return dataset
    refuse_or_skip(problems, "image(s) or map(s) cannot be decoded:", skip_unreadable)
    kept = [sample for sample, message in zip(dataset.samples, results, strict=True) if not message]
    return dataset.rebuilt(kept)


def saliency_provenance(samples_or_heatmaps_dir: Iterable[Sample] | str | os.PathLike[str] | None) -> str:
    """"human", "proxy" or "none": "proxy" when a maps folder holds the PROVENANCE.json that
    `cyborg saliency prior` writes, "none" when no sample has a map (or the folder holds no map)."""
    if samples_or_heatmaps_dir is None:
        return "none"
    if isinstance(samples_or_heatmaps_dir, (str, os.PathLike)):
        folder = Path(samples_or_heatmaps_dir)
        if not folder.is_dir():
            return "none"
        folders = {folder} if len(MapIndex(folder)) else set()
    else:
        folders = {s.map_path.parent for s in samples_or_heatmaps_dir if s.map_path is not None}
    if not folders:
        return "none"
    for folder in folders:
        provenance = read_provenance(folder)
        if provenance is not None and provenance.get("source") != "human":
            return "proxy"
    return "human"


def summarise(samples: Sequence[Sample]) -> dict[str, dict[str, int]]:
    """Counts per split, class and source: {"train": {"real": 8, "fake": 8, "fake/stylegan": 4, ...}}."""
    counts: dict[str, dict[str, int]] = {}
    for sample in samples:
        split = counts.setdefault(sample.split, {})
        name = CLASS_NAMES[sample.label]
        split[name] = split.get(name, 0) + 1
        key = f"{name}/{sample.source}"
        split[key] = split.get(key, 0) + 1
    return counts

