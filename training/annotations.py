"""Human saliency annotations: the store `cyborg annotate` writes, and the merge into training maps.

An annotation session is a folder:

    SESSION/session.json                     the frozen image list (id, path, label, size) and options
    SESSION/annotators/NAME/answers.jsonl    one JSON line per answer, appended as it is given
    SESSION/annotators/NAME/masks/ID-R.png   the stroke mask of image ID, repeat R (8-bit, image size)

Each annotator has their own folder, so annotators never write the same file; a mask is written
atomically (temporary file, fsync, rename) before its answer line is appended and fsync'ed, so every
line names a complete mask and a crash loses at most the answer being saved. Each annotator sees
every image `repeats` times in an order seeded by (seed, annotator, repeat); the next image is the
first position without an answer, so a new visit resumes where the last one stopped.

`merge` averages the annotators' masks of each image into one grayscale map named like the proxy
maps (image stem + .png), the folder `cyborg train --heatmaps` reads, with PROVENANCE.json saying
`"source": "human"` and how many annotators marked each image; `report` measures the session
(human accuracy per class, agreement between annotators, time per image).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import random
import re
import statistics
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core import __version__
from core.contract import CLASS_NAMES, utc_now
from core.errors import UserError

SESSION_FILE = "session.json"
SESSION_FORMAT = 1
ANNOTATORS_DIR = "annotators"
ANSWERS_FILE = "answers.jsonl"
MASKS_DIR = "masks"
REPORT_FILE = "report.json"
MERGE_METHOD = "cyborg-annotate"
ANNOTATOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
DECISIONS = CLASS_NAMES  # ("real", "fake")
MAX_MASK_BYTES = 8 * 1024 * 1024
MAX_TIME_MS = 24 * 3600 * 1000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AGREEMENT_GRID = 32  # masks are compared on this grid (area average) for the correlation
MASK_ON = 0.5  # a pixel of an annotator's mask counts as marked above this, for the IoU


class AnnotationError(UserError):
    """An answer or upload that cannot be accepted (the web app answers 400)."""


class AlreadyAnswered(AnnotationError):
    """The position was answered meanwhile (another tab or process); the web app answers 409."""


@dataclass(frozen=True)
class Item:
    """One image of the session."""

    id: str
    path: str  # relative to the data root, with "/"
    label: str  # "real" | "fake"
    width: int
    height: int
    split: str = "train"
    source: str = ""


@dataclass(frozen=True)
class Assignment:
    position: int
    item: Item
    repeat: int


def image_id(relative_path: str) -> str:
    return hashlib.sha1(relative_path.encode()).hexdigest()[:16]


def check_annotator(name: str) -> str:
    """The annotator's name if it is safe as a folder name (letters, digits, `_ . -`, at most 40)."""
    if not isinstance(name, str) or not ANNOTATOR_NAME.match(name):
        raise AnnotationError("annotator name: 1-40 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return name


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode="L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def read_mask_upload(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """An uploaded stroke mask as uint8 [H, W] (0 unmarked, 255 marked).

    It must be a PNG of exactly the image's size (width, height); the size is checked from the header
    before any pixel is decoded. The mask is the gray level, composited over black where the PNG has
    an alpha channel (white strokes on black, or on transparency, as a canvas exports them).
    """
    if len(data) > MAX_MASK_BYTES:
        raise AnnotationError(f"mask: {len(data)} bytes, at most {MAX_MASK_BYTES}")
    if not data.startswith(PNG_SIGNATURE):
        raise AnnotationError("mask: not a PNG file")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.size != tuple(size):
                raise AnnotationError(f"mask: {image.size[0]}x{image.size[1]}, the image is {size[0]}x{size[1]}")
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                gray = np.asarray(rgba.convert("L"), dtype=np.uint16)
                alpha = np.asarray(rgba, dtype=np.uint16)[..., 3]
                array = ((gray * alpha + 127) // 255).astype(np.uint8)  # composited over black
            else:
                array = np.asarray(image.convert("L"), dtype=np.uint8)
    except AnnotationError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise AnnotationError(f"mask: unreadable PNG ({error})") from error
    return np.ascontiguousarray(array)


# ---- the session ---------------------------------------------------------------------------------
class Session:
    """A session folder: its frozen image list, the options, and one log per annotator."""

    def __init__(self, root: Path, record: dict[str, Any]):
        self.root = Path(root)
        self.record = record
        self.data = Path(record["data"])
        self.seed = int(record["seed"])
        self.repeats = int(record["repeats"])
        self.show_label = bool(record["show_label"])
        self.items = [Item(**item) for item in record["images"]]
        self.by_id = {item.id: item for item in self.items}
        self._logs: dict[str, AnnotatorLog] = {}
        self._lock = threading.Lock()

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> Session:
        path = Path(root) / SESSION_FILE
        if not path.is_file():
            raise UserError(f"{root}: no {SESSION_FILE} (not an annotation session; `cyborg annotate DATA --out {root}` starts one)")
        try:
            record = json.loads(path.read_text())
            if record.get("format") != SESSION_FORMAT:
                raise ValueError(f"format {record.get('format')!r}, expected {SESSION_FORMAT}")
            return cls(Path(root), record)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"{path}: unreadable session file ({error})") from error

    @classmethod
    def create_or_open(
        cls, root: str | os.PathLike[str], data: str | os.PathLike[str], csv: str | os.PathLike[str] | None = None, *,
        seed: int = 0, repeats: int = 1, show_label: bool = False,
    ) -> Session:  # fmt: skip
        """Open the session in `root`, or start one on the images of `data`. A session keeps its image
        list and options; asking for other ones is an error (start another folder)."""
        root = Path(root)
        if repeats < 1:
            raise UserError(f"--repeats {repeats}: at least 1")
        wanted = {"data": str(Path(data).resolve()), "csv": str(Path(csv).resolve()) if csv else None,
                  "seed": int(seed), "repeats": int(repeats), "show_label": bool(show_label)}  # fmt: skip
        if (root / SESSION_FILE).is_file():
            session = cls.open(root)
            differ = [f"{key} {session.record.get(key)!r} (asked {value!r})" for key, value in wanted.items() if session.record.get(key) != value]
            if differ:
                raise UserError(f"{root}: the session there was started with other options: {', '.join(differ)}; use them or another --out")
            return session
        if root.exists() and not root.is_dir():
            raise UserError(f"--out {root}: exists and is not a folder")
        if root.is_dir() and any(root.iterdir()):
            raise UserError(f"--out {root}: not empty and holds no {SESSION_FILE}; choose an empty or new folder")
        items = list_items(data, csv)
        if not items:
            raise UserError(f"{data}: no images")
        record = {"format": SESSION_FORMAT, **wanted, "created": utc_now(), "cyborg": __version__,
                  "images": [item.__dict__ for item in items]}  # fmt: skip
        atomic_write(root / SESSION_FILE, (json.dumps(record, indent=1) + "\n").encode())
        return cls(root, record)

    # -- reading -----------------------------------------------------------------------------------
    def image_path(self, item: Item) -> Path:
        return self.data / item.path

    def annotators(self) -> list[str]:
        folder = self.root / ANNOTATORS_DIR
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and ANNOTATOR_NAME.match(p.name))

    def log(self, annotator: str) -> AnnotatorLog:
        annotator = check_annotator(annotator)
        with self._lock:
            if annotator not in self._logs:
                self._logs[annotator] = AnnotatorLog(self, annotator)
            return self._logs[annotator]

    def queue(self, annotator: str) -> list[Assignment]:
        """The annotator's images in their seeded order: every image once per repeat, repeats in turn."""
        check_annotator(annotator)
        assignments = []
        for repeat in range(self.repeats):
            order = list(self.items)
            random.Random(f"{self.seed}:{annotator}:{repeat}").shuffle(order)
            start = len(assignments)
            assignments.extend([Assignment(start + i, item, repeat) for i, item in enumerate(order)])
        return assignments

    def all_answers(self) -> list[dict[str, Any]]:
        return [answer for name in self.annotators() for answer in self.log(name).answers()]


def list_items(data: str | os.PathLike[str], csv: str | os.PathLike[str] | None) -> list[Item]:
    """Every image of a data set (training.data's layouts), sorted by path, with its size."""
    from training.data import discover  # torch loads here, not when the store is only read

    root = Path(data).resolve()
    items, seen = [], set()
    for sample in sorted(discover(data, csv=csv), key=lambda s: str(s.path)):
        path = Path(sample.path).resolve()
        try:
            relative = path.relative_to(root).as_posix()
        except ValueError as error:
            raise UserError(f"{sample.path}: outside the data folder {root}") from error
        if relative in seen:
            continue
        seen.add(relative)
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, SyntaxError, ValueError) as error:
            raise UserError(f"{path}: unreadable image ({error}); `cyborg data check` lists them") from error
        items.append(Item(image_id(relative), relative, CLASS_NAMES[sample.label], width, height, sample.split, sample.source))
    return items


class AnnotatorLog:
    """One annotator's answers: appended one line at a time, read back on every visit."""

    def __init__(self, session: Session, annotator: str):
        self.session = session
        self.annotator = annotator
        self.folder = session.root / ANNOTATORS_DIR / annotator
        self.path = self.folder / ANSWERS_FILE
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """This annotator's lock, held across threads and processes (flock on a lock file)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.folder / ".lock", "a") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def answers(self) -> list[dict[str, Any]]:
        """Every complete answer line (a torn last line from a crash is left out)."""
        if not self.path.is_file():
            return []
        answers = []
        for line in self.path.read_text().splitlines():
            try:
                answer = json.loads(line)
            except ValueError:
                continue
            if isinstance(answer, dict) and "position" in answer:
                answers.append(answer)
        return answers

    def progress(self) -> tuple[Assignment | None, int, int]:
        """(the next assignment or None when done, positions answered, positions in all)."""
        queue = self.session.queue(self.annotator)
        answered = {int(a["position"]) for a in self.answers()}
        pending = next((a for a in queue if a.position not in answered), None)
        return pending, len(answered & set(range(len(queue)))), len(queue)

    def mask_path(self, item: Item, repeat: int) -> Path:
        return self.folder / MASKS_DIR / f"{item.id}-{repeat}.png"

    def record(self, position: int, image: str, decision: str, time_ms: float, mask_png: bytes) -> dict[str, Any]:
        """Validate and store one answer; AnnotationError naming what is wrong, AlreadyAnswered
        when the position has an answer."""
        queue = self.session.queue(self.annotator)
        if not isinstance(position, int) or not 0 <= position < len(queue):
            raise AnnotationError(f"position {position!r}: not in this annotator's queue (0..{len(queue) - 1})")
        assignment = queue[position]
        if image != assignment.item.id:
            raise AnnotationError(f"image {image!r}: position {position} is image {assignment.item.id}")
        if decision not in DECISIONS:
            raise AnnotationError(f"decision {decision!r}: one of {', '.join(DECISIONS)}")
        try:
            time_ms = float(time_ms)
        except (TypeError, ValueError) as error:
            raise AnnotationError(f"time_ms {time_ms!r}: a number of milliseconds") from error
        if not 0 <= time_ms <= MAX_TIME_MS:
            raise AnnotationError(f"time_ms {time_ms}: between 0 and {MAX_TIME_MS}")
        item = assignment.item
        mask = read_mask_upload(mask_png, (item.width, item.height))
        with self.locked():
            if any(int(a["position"]) == position for a in self.answers()):
                raise AlreadyAnswered(f"position {position} is already answered")
            mask_path = self.mask_path(item, assignment.repeat)
            atomic_write(mask_path, png_bytes(mask))
            answer = {
                "annotator": self.annotator, "position": position, "image": item.id, "path": item.path,
                "repeat": assignment.repeat, "decision": decision, "label": item.label,
                "label_shown": self.session.show_label, "correct": decision == item.label,
                "time_ms": round(time_ms, 1), "marked_fraction": round(float(np.count_nonzero(mask)) / mask.size, 6),
                "mask": mask_path.relative_to(self.session.root).as_posix(), "saved": utc_now(),
            }  # fmt: skip
            self._append(answer)
        return answer

    def _append(self, answer: dict[str, Any]) -> None:
        line = json.dumps(answer, sort_keys=True) + "\n"
        with open(self.path, "ab") as file:
            if file.tell() > 0:  # a torn last line (a crash mid-write) is closed off, not extended
                with open(self.path, "rb") as reader:
                    reader.seek(-1, os.SEEK_END)
                    if reader.read(1) != b"\n":
                        line = "\n" + line
            file.write(line.encode())
            file.flush()
            os.fsync(file.fileno())


# ---- merge and report ----------------------------------------------------------------------------
def load_mask(session: Session, answer: dict[str, Any]) -> np.ndarray:
    """An answer's mask as float32 [H, W] in [0, 1]."""
    path = (session.root / answer["mask"]).resolve()
    if session.root.resolve() not in path.parents:
        raise UserError(f"{session.root}: answer of {answer.get('annotator')} names a mask outside the session: {answer['mask']}")
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def per_annotator_maps(session: Session, answers: Sequence[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """{image id: {annotator: mean of that annotator's masks of the image (over repeats)}}."""
    sums: dict[str, dict[str, list[np.ndarray]]] = {}
    for answer in answers:
        if answer["image"] not in session.by_id:
            continue
        sums.setdefault(answer["image"], {}).setdefault(answer["annotator"], []).append(load_mask(session, answer))
    return {image: {name: np.mean(masks, axis=0) for name, masks in by_name.items()} for image, by_name in sums.items()}


def map_name(item: Item) -> str:
    """The merged map's file name: the image's stem + .png, as the proxy maps (matched by stem)."""
    return Path(item.path).stem + ".png"


def merge(session: Session, out: str | os.PathLike[str], *, correct_only: bool = False, min_annotators: int = 1) -> dict[str, Any]:
    """Average the annotators' masks of every image into OUT/<stem>.png, write OUT/PROVENANCE.json
    (source "human") and OUT/report.json; returns the report. Annotators who marked nothing on an
    image do not dilute the others; an image marked by fewer than `min_annotators` gets no map."""
    from training.saliency import PROVENANCE_FILE, read_provenance

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    previous = read_provenance(out) if out.is_dir() else None
    if out.is_dir() and any(p for p in out.iterdir() if p.name != REPORT_FILE):
        if previous is None or previous.get("method") != MERGE_METHOD:
            raise UserError(f"--out {out}: holds files not written by `cyborg saliency merge`; choose an empty or new folder")
    names = {}
    for item in session.items:
        names.setdefault(map_name(item), []).append(item.path)
    clashes = [paths for paths in names.values() if len(paths) > 1]
    if clashes:
        raise UserError(f"images that would share one map name (their stems clash): {clashes[:3]}; rename them")
    answers = [a for a in session.all_answers() if not correct_only or a.get("correct")]
    maps = per_annotator_maps(session, answers)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, Any] = {}
    for item in session.items:
        marked = {name: mask for name, mask in maps.get(item.id, {}).items() if float(mask.max()) > 0}
        if len(marked) < max(1, min_annotators):
            continue
        average = np.mean(list(marked.values()), axis=0)
        atomic_write(out / map_name(item), png_bytes(np.clip(average * 255.0, 0, 255).round()))
        images[map_name(item)] = {"image": item.path, "label": item.label, "annotators": len(marked),
                                  "annotations": sum(1 for a in answers if a["image"] == item.id)}  # fmt: skip
    for stale in (previous or {}).get("images", {}):
        if stale not in images and (out / stale).is_file() and Path(stale).name == stale:
            (out / stale).unlink()
    counts = [entry["annotators"] for entry in images.values()]
    provenance = {
        "source": "human", "method": MERGE_METHOD,
        "description": "mean of the annotators' stroke masks (cyborg annotate); 255 = every annotator marked the pixel",
        "session": str(session.root.resolve()), "data": str(session.data), "label_shown": session.show_label,
        "correct_only": correct_only, "min_annotators": min_annotators, "count": len(images),
        "annotators": sorted({a["annotator"] for a in answers}),
        "annotators_per_image": {"min": min(counts), "max": max(counts), "mean": round(statistics.fmean(counts), 3)} if counts else None,
        "images": images, "created": utc_now(), "cyborg": __version__,
    }  # fmt: skip
    atomic_write(out / PROVENANCE_FILE, (json.dumps(provenance, indent=1) + "\n").encode())
    result = report(session, maps=maps)
    result["maps"] = {"folder": str(out), "written": len(images)}
    atomic_write(out / REPORT_FILE, (json.dumps(result, indent=1) + "\n").encode())
    return result


def _grid(mask: np.ndarray) -> np.ndarray:
    image = Image.fromarray(mask.astype(np.float32), mode="F").resize((AGREEMENT_GRID, AGREEMENT_GRID), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64).ravel()


def _describe(values: Sequence[float], digits: int = 3) -> dict[str, Any] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"n": len(values), "mean": round(statistics.fmean(values), digits), "median": round(statistics.median(values), digits),
            "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], digits)}  # fmt: skip


def report(session: Session, maps: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """What the session measured: images done, annotators, human accuracy per class (answers given
    with the label hidden), agreement between annotators, time per image."""
    answers = session.all_answers()
    maps = per_annotator_maps(session, answers) if maps is None else maps
    hidden = [a for a in answers if not a.get("label_shown")]
    per_class = {}
    for name in CLASS_NAMES:
        judged = [a for a in hidden if a["label"] == name]
        right = sum(1 for a in judged if a["correct"])
        per_class[name] = {"answers": len(judged), "correct": right, "accuracy": round(right / len(judged), 4) if judged else None}
    annotators = []
    for name in session.annotators():
        mine = [a for a in answers if a["annotator"] == name]
        judged = [a for a in mine if not a.get("label_shown")]
        annotators.append({"name": name, "answers": len(mine), "of": len(session.items) * session.repeats,
                           "accuracy": round(sum(a["correct"] for a in judged) / len(judged), 4) if judged else None,
                           "seconds_per_image": _describe([a["time_ms"] / 1000 for a in mine], 2)})  # fmt: skip
    ious, correlations, same_decision = [], [], []
    decisions: dict[str, dict[str, list[str]]] = {}
    for a in answers:
        decisions.setdefault(a["image"], {}).setdefault(a["annotator"], []).append(a["decision"])
    for image, by_name in maps.items():
        names = sorted(by_name)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                one, two = by_name[first], by_name[second]
                union = np.logical_or(one > MASK_ON, two > MASK_ON).sum()
                if union:
                    ious.append(float(np.logical_and(one > MASK_ON, two > MASK_ON).sum() / union))
                x, y = _grid(one), _grid(two)
                if x.std() > 0 and y.std() > 0:
                    correlations.append(float(np.corrcoef(x, y)[0, 1]))
                same_decision.append(decisions[image][first][0] == decisions[image][second][0])
    done = {a["image"] for a in answers}
    return {
        "session": str(session.root), "images": len(session.items), "images_done": len(done & set(session.by_id)),
        "answers": len(answers), "repeats": session.repeats, "label_shown": session.show_label,
        "annotators": annotators, "accuracy_per_class": per_class,
        "accuracy": round(sum(a["correct"] for a in hidden) / len(hidden), 4) if hidden else None,
        "agreement": {"pairs": len(same_decision), "mean_iou": round(statistics.fmean(ious), 4) if ious else None,
                      "iou_pairs": len(ious), "mean_map_correlation": round(statistics.fmean(correlations), 4) if correlations else None,
                      "correlation_pairs": len(correlations), "correlation_grid": AGREEMENT_GRID,
                      "same_decision": round(sum(same_decision) / len(same_decision), 4) if same_decision else None},
        "seconds_per_image": _describe([a["time_ms"] / 1000 for a in answers], 2),
    }  # fmt: skip


def format_report(result: dict[str, Any]) -> str:
    """The report as a few lines of text."""

    def pct(value):
        return "-" if value is None else f"{value:.1%}"

    def num(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"session: {result['session']}",
             f"images: {result['images_done']} of {result['images']} done; {result['answers']} answers"
             f" ({result['repeats']} per annotator per image); label {'shown' if result['label_shown'] else 'hidden'}"]  # fmt: skip
    if result.get("maps"):
        lines.append(f"maps: {result['maps']['written']} written to {result['maps']['folder']}")
    for name, entry in result["accuracy_per_class"].items():
        lines.append(f"human accuracy on {name}: {pct(entry['accuracy'])} ({entry['correct']}/{entry['answers']})")
    agreement = result["agreement"]
    lines.append(f"agreement ({agreement['pairs']} annotator pairs on shared images): mean IoU {num(agreement['mean_iou'])}, "
                 f"map correlation {num(agreement['mean_map_correlation'])}, same decision {pct(agreement['same_decision'])}")  # fmt: skip
    seconds = result["seconds_per_image"]
    if seconds:
        lines.append(f"seconds per image: mean {seconds['mean']:.1f}, median {seconds['median']:.1f}, p90 {seconds['p90']:.1f}")
    lines.append("annotator         answers  accuracy  median s")
    for entry in result["annotators"]:
        median = entry["seconds_per_image"]["median"] if entry["seconds_per_image"] else None
        lines.append(f"{entry['name']:<16} {entry['answers']:>4}/{entry['of']:<4} {pct(entry['accuracy']):>8}  {num(median, 1):>8}")
    return "\n".join(lines)
