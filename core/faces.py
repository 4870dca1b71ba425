"""Face geometry shared by training and serving: FFHQ alignment from five landmarks.

A detector (engines/faces.py) gives each face a box and five landmarks (left eye, right eye, nose,
left and right mouth corner, in image pixels). `ffhq_quad` turns them into the oriented square
FFHQ's own alignment script cuts (the eye and mouth centres fix its centre, size and rotation),
and `align` resamples the original pixels once into that square at any size, or into any part of
it: `model_input` asks for the model's centre crop of the square at the contract's scale, which is
exactly what `core.images.prepare` gives for an FFHQ-aligned 256-px crop. Nothing here runs a
network.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from core.contract import LEGACY_SCALE, ModelContract
from core.images import crop_box, to_chw

LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # as seen in the picture
ALIGN_RESAMPLING = Image.Resampling.BILINEAR
# "auto" input: a picture counts as an aligned crop when it holds exactly one face whose FFHQ square
# is this close to the picture's own square (side ratio and centre offset, relative to the shorter side).
AUTO_SIDE_RATIO = (0.8, 1.25)
AUTO_CENTRE_OFFSET = 0.1


@dataclasses.dataclass
class Face:
    """One detected face, in the pixels of the picture it was found in."""

    box: tuple[float, float, float, float]  # left, top, right, bottom
    landmarks: np.ndarray  # float [5, 2] (x, y) in LANDMARKS order
    confidence: float  # the detector's face score in [0, 1]

    def scaled(self, factor_x: float, factor_y: float) -> Face:
        """The same face in a picture resized by (factor_x, factor_y)."""
        left, top, right, bottom = self.box
        box = (left * factor_x, top * factor_y, right * factor_x, bottom * factor_y)
        return Face(box, self.landmarks * np.array([factor_x, factor_y]), self.confidence)

    @property
    def size(self) -> float:
        """The side of the face's FFHQ square, in pixels: the size the limits judge."""
        return ffhq_quad(self.landmarks)[1]


def ffhq_quad(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """(centre (x, y), side, unit x axis) of FFHQ's crop square for five landmarks, as
    `(centre_and_axis [3, 2], side)`: rows centre, x axis (half side long), y axis (half side long).

    FFHQ's rule (ffhq-dataset/download_ffhq.py, recreate_aligned_images): from the eye centres and
    the mouth corners, x = eye_to_eye - rot90(eye_to_mouth), scaled to max(2 |eye_to_eye|,
    1.8 |eye_to_mouth|); the centre is the eye midpoint moved 0.1 eye_to_mouth towards the mouth.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    eye_left, eye_right, _, mouth_left, mouth_right = points
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= max(np.hypot(*x), 1e-9)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    centre = eye_avg + eye_to_mouth * 0.1
    return np.stack([centre, x, y]), float(np.hypot(*x) * 2)


def square_to_picture(landmarks: np.ndarray, size: int) -> np.ndarray:
    """The 2x3 affine matrix taking (u, v) pixels of the FFHQ square drawn at `size` to picture pixels."""
    (centre, x, y), _ = ffhq_quad(landmarks)
    origin = centre - x - y  # the square's top-left corner in the picture
    return np.array([[2 * x[0] / size, 2 * y[0] / size, origin[0]], [2 * x[1] / size, 2 * y[1] / size, origin[1]]])


def picture_to_square(landmarks: np.ndarray, size: int) -> np.ndarray:
    """The inverse of `square_to_picture`: picture pixels to (u, v) of the square at `size`."""
    forward = np.vstack([square_to_picture(landmarks, size), [0, 0, 1]])
    return np.linalg.inv(forward)[:2]


def align(image: Image.Image, landmarks: np.ndarray, size: int, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The face's FFHQ square drawn at `size` x `size` from `image` (RGB), or only the part `box`
    (left, top, right, bottom in that square's pixels) of it, in one bilinear resampling.

    Where the square leaves the picture the picture is mirrored (FFHQ pads by reflection too). When
    the face is more than twice the output size the picture is first box-reduced by an integer
    factor, as FFHQ's script shrinks before transforming, so the bilinear step never aliases.
    """
    box = (0, 0, size, size) if box is None else box
    matrix = square_to_picture(landmarks, size)
    scale = float(np.hypot(*matrix[:, 0]))  # picture pixels per output pixel
    if (factor := int(scale // 2)) >= 2:
        image = image.reduce(factor)
        matrix = matrix / factor
    corners = np.array([[box[0], box[1], 1], [box[2], box[1], 1], [box[0], box[3], 1], [box[2], box[3], 1]]) @ matrix.T
    left, top = np.floor(corners.min(axis=0)).astype(int) - 2
    right, bottom = np.ceil(corners.max(axis=0)).astype(int) + 2
    width, height = image.size
    region = image.crop((max(left, 0), max(top, 0), min(right, width), min(bottom, height)))
    pads = (max(0, -top), max(0, bottom - height)), (max(0, -left), max(0, right - width))
    if any(any(pad) for pad in pads):
        if region.width < 1 or region.height < 1:
            region = image.crop((0, 0, 1, 1))
        pixels = np.pad(np.asarray(region), (*pads, (0, 0)), mode="symmetric")
        region = Image.fromarray(pixels)
    offset = np.array([max(left, 0) - pads[1][0], max(top, 0) - pads[0][0]])
    shifted = matrix.copy()
    shifted[:, 2] += matrix[:, :2] @ [box[0], box[1]] - offset  # output (0, 0) is the box's corner, in the region
    data = (*shifted[0], *shifted[1])
    return region.transform((box[2] - box[0], box[3] - box[1]), Image.Transform.AFFINE, data, ALIGN_RESAMPLING)


def square_size(contract: ModelContract) -> int:
    """The side at which a model sees a whole aligned square: its scale (the shorter side of the
    prepared picture), or for a legacy contract its input size."""
    return contract.scale if contract.scale != LEGACY_SCALE else contract.input_height


def model_box(contract: ModelContract) -> tuple[int, int, int, int]:
    """The part of the square at `square_size` that the model sees (its centre crop)."""
    size = square_size(contract)
    if contract.scale == LEGACY_SCALE:
        return (0, 0, contract.input_width, contract.input_height)
    return crop_box((size, size), contract.input_height, contract.input_width)


def model_input(image: Image.Image, landmarks: np.ndarray, contract: ModelContract) -> np.ndarray:
    """uint8 [3, H, W]: the model's input for one face of `image`, aligned as the training crops are
    (FFHQ square at the model's scale, then its centre crop), from the original pixels in one step."""
    return to_chw(align(image, landmarks, square_size(contract), model_box(contract)))


def fills_frame(face: Face, size: tuple[int, int]) -> bool:
    """Whether `face` is what an aligned crop of a picture of `size` looks like: its FFHQ square's
    side within AUTO_SIDE_RATIO of the picture's shorter side, and its centre within
    AUTO_CENTRE_OFFSET of that side from the picture's centre."""
    (centre, _, _), side = ffhq_quad(face.landmarks)
    short = min(size)
    offset = np.hypot(centre[0] - size[0] / 2, centre[1] - size[1] / 2)
    return AUTO_SIDE_RATIO[0] * short <= side <= AUTO_SIDE_RATIO[1] * short and offset <= AUTO_CENTRE_OFFSET * short
