"""Photos with faces: find every face, align each to the model's crop, and put the CAMs back.

The data plane calls `find_faces` (on the worker pool) for a request whose input kind is `photo`
or `auto`; it returns the faces with their statuses and the model inputs of the faces to score,
which go through the model's batcher like any rows (so faces from many requests share engine
batches). `place_cams` draws the scored faces' CAMs on the photo for PNG heatmaps.
"""

from __future__ import annotations

import dataclasses
import io
import threading

import numpy as np
from PIL import Image

from core import heatmaps
from core.contract import ModelContract
from core.faces import Face, fills_frame, model_box, model_input, picture_to_square, square_size
from core.images import RESAMPLING

INPUT_KINDS = ("aligned", "photo", "auto")
DEFAULT_MAX_FACES = 32
DEFAULT_MIN_FACE = 64  # pixels: the side of a face's FFHQ square in the original image
SCORED, TOO_SMALL, OVER_LIMIT = "scored", "too_small", "over_limit"
EXIF_SWAPS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclasses.dataclass
class FaceResult:
    """One face of a photo, in the upright original image's pixels."""

    box: tuple[float, float, float, float]
    landmarks: np.ndarray  # [5, 2]
    confidence: float
    status: str = SCORED
    score: float = 0.0
    probability: float = 0.0
    label: str = ""
    cam: np.ndarray | None = None  # the CAM on the face's aligned crop (scored faces)


@dataclasses.dataclass
class Found:
    """What `find_faces` gives the data plane."""

    aligned: bool  # auto found one face filling the frame: score the picture whole
    faces: list[FaceResult]  # every face found, largest first
    scored: list[int]  # indices into faces of those to score, in input order
    inputs: np.ndarray  # uint8 [len(scored), 3, H, W]
    decoded: list[Face]  # the scored faces in the decoded picture's pixels (for placing CAMs)


class Detectors:
    """One face detector per server, made on first use (so servers that never see a photo never load it)."""

    def __init__(self):
        self._detector = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._detector is None:
                from engines.faces import FaceDetector

                self._detector = FaceDetector()
            return self._detector


def upright_size(data: bytes | None, decoded: Image.Image) -> tuple[int, int]:
    """The (width, height) of the image as a viewer shows it (EXIF orientation applied), before any
    reduced-scale decoding; the decoded size for tensors or unreadable headers."""
    if data is None:
        return decoded.size
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - the image decoded already; its header is only a hint here
        return decoded.size
    return (height, width) if orientation in EXIF_SWAPS else (width, height)


def find_faces(
    detector, image: Image.Image, original: tuple[int, int], contract: ModelContract, kind: str, max_faces: int, min_face: int
) -> Found:
    """Faces of `image` (decoded, possibly at a reduced scale of an `original`-sized picture)."""
    faces = detector.detect(image)
    if kind == "auto" and len(faces) == 1 and fills_frame(faces[0], image.size):
        return Found(True, [], [], np.zeros((0, *contract.input_shape), np.uint8), [])
    to_original = (original[0] / image.width, original[1] / image.height)
    faces.sort(key=lambda face: -face.size)
    results, scored, decoded = [], [], []
    for face in faces:
        moved = face.scaled(*to_original)
        status = TOO_SMALL if moved.size < min_face else OVER_LIMIT if len(scored) >= max_faces else SCORED
        if status == SCORED:
            scored.append(len(results))
            decoded.append(face)
        results.append(FaceResult(tuple(round(v, 2) for v in moved.box), moved.landmarks.round(2), round(face.confidence, 4), status))
    inputs = np.stack([model_input(image, face.landmarks, contract) for face in decoded]) if decoded else np.zeros((0, *contract.input_shape), np.uint8)
    return Found(False, results, scored, inputs, decoded)


def place_cams(kind: str, cams: list[np.ndarray], faces: list[Face], picture: np.ndarray, scale: float, contract: ModelContract) -> bytes:
    """PNG (`png`: grayscale; `overlay`: jet over the picture) of the photo with each face's CAM warped
    back from its aligned crop. `picture` is the decoded image resized by `scale`; outside every face
    there is no evidence (0, or the picture unchanged)."""
    height, width = picture.shape[:2]
    values = np.zeros((height, width), np.float32)
    inside = np.zeros((height, width), bool)
    size, (left, top, right, bottom) = square_size(contract), model_box(contract)
    for cam, face in zip(cams, faces):
        crop = heatmaps.upsample(cam, bottom - top, right - left)
        to_square = picture_to_square(face.landmarks, size)  # decoded pixels -> square pixels
        matrix = to_square @ np.diag([1 / scale, 1 / scale, 1.0]) - [[0, 0, left], [0, 0, top]]  # picture -> crop
        data = (*matrix[0], *matrix[1])
        placed = Image.fromarray(crop, mode="F").transform((width, height), Image.Transform.AFFINE, data, RESAMPLING, fillcolor=-1.0)
        placed = np.asarray(placed, np.float32)
        mask = placed >= 0
        values[mask] = np.maximum(values[mask], placed[mask])
        inside |= mask
    values = np.clip(values, 0.0, 1.0)
    if kind == "png":
        return heatmaps.encode_png(np.where(inside, (values * 255).round(), 0).astype(np.uint8))
    blended = picture.copy()
    blended[inside] = heatmaps.blend(picture[inside][None], values[inside][None])[0]
    return heatmaps.encode_png(blended)
