"""Faces in photos: FFHQ alignment geometry (core/faces.py) and the MTCNN detector (engines/faces.py).

Geometry is checked on synthetic pictures; the detector on the shared photos and aligned faces
(../shared/data, skipped without it) and on pictures built here (no face, a small face, EXIF).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.contract import ModelContract
from core.faces import Face, align, ffhq_quad, fills_frame, model_box, model_input, picture_to_square, square_to_picture

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTOS = SHARED / "photos"
FACES = SHARED / "faces"
needs_shared = pytest.mark.skipif(not PHOTOS.is_dir() or not FACES.is_dir(), reason="../shared/data (photos, faces) is not here")

# Landmarks of a typical FFHQ-aligned 256-px face (as the detector finds them on the shared faces).
ALIGNED_256 = np.array([[95.0, 118.0], [161.0, 118.0], [128.0, 155.0], [101.0, 189.0], [155.0, 189.0]])


def contract(scale: int = 256, size: int = 224) -> ModelContract:
    return ModelContract(name="m", version=1, architecture="a", input_height=size, input_width=size, cam_height=7, cam_width=7,
                         mean=[0.5] * 3, std=[0.5] * 3, threshold=0.5, scale=scale)  # fmt: skip


def test_ffhq_square_of_an_aligned_face_is_the_picture():
    (centre, x, y), side = ffhq_quad(ALIGNED_256)
    assert abs(side - 256) < 16 and np.hypot(*(centre - 128)) < 8
    assert abs(np.dot(x, y)) < 1e-6 and np.isclose(np.hypot(*x), np.hypot(*y))  # a square, not a parallelogram


def test_square_and_picture_maps_are_inverse():
    forward, backward = square_to_picture(ALIGNED_256, 224), picture_to_square(ALIGNED_256, 224)
    points = np.array([[0, 0, 1], [224, 0, 1], [100, 50, 1]], dtype=float)
    there = points @ forward.T
    back = np.column_stack([there, np.ones(3)]) @ backward.T
    assert np.allclose(back, points[:, :2])


def test_align_undoes_a_similarity_transform():
    """A picture rotated, scaled and moved by a known similarity comes back to the original square."""
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).resize((256, 256), Image.Resampling.BICUBIC)
    angle, zoom, shift = np.deg2rad(20), 1.6, np.array([300.0, 200.0])
    rotation = zoom * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    inverse = np.linalg.inv(rotation)  # picture -> original: Pillow's AFFINE wants output -> input
    offset = -inverse @ shift
    picture = original.transform((800, 700), Image.Transform.AFFINE, (*inverse[0], offset[0], *inverse[1], offset[1]), Image.Resampling.BICUBIC)
    moved = ALIGNED_256 @ rotation.T + shift
    (centre, _, _), side = ffhq_quad(ALIGNED_256)
    back = align(picture, moved, 256)
    assert back.size == (256, 256)
    # compare the inner part (the square of the original's landmarks is not exactly the whole picture)
    expected = align(original, ALIGNED_256, 256)
    error = np.abs(np.asarray(back, np.float32) - np.asarray(expected, np.float32))[40:216, 40:216].mean()
    assert error < 6, error


def test_model_input_is_prepare_of_the_aligned_square():
    """For an aligned crop, the model input equals the model's centre crop of the square at its scale."""
    from core.images import prepare

    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).resize((256, 256), Image.Resampling.BICUBIC)
    landmarks = np.array([[96.0, 122.0], [160.0, 122.0], [128.0, 150.0], [102.0, 182.0], [154.0, 182.0]])  # square = picture
    (centre, _, _), side = ffhq_quad(landmarks)
    assert np.allclose(centre, 128) and np.isclose(side, 256)
    for c in (contract(256, 224), contract(0, 224)):
        assert model_box(c) == ((16, 16, 240, 240) if c.scale else (0, 0, 224, 224))
        ours = model_input(picture, landmarks, c).astype(np.float32)
        assert ours.shape == (3, 224, 224)
        difference = np.abs(ours - prepare(picture, c).astype(np.float32)).mean()
        assert difference < (0.1 if c.scale else 1.5), difference  # the same pixels (legacy: prepare antialiases its resize)


def test_align_mirrors_outside_the_picture_and_shrinks_large_faces():
    picture = Image.new("RGB", (300, 200), (200, 10, 10))
    edge = ALIGNED_256 * 0.5 + [-30, -20]  # a face hanging off the top-left corner
    out = align(picture, edge, 64)
    assert out.size == (64, 64) and np.asarray(out)[..., 0].min() > 150  # mirrored red, no black border
    big = Image.new("RGB", (4000, 3000), (0, 90, 0))
    assert align(big, ALIGNED_256 * 10, 128).size == (128, 128)


def test_fills_frame_rule():
    face = Face((40, 40, 216, 216), ALIGNED_256, 0.99)
    assert fills_frame(face, (256, 256))
    assert not fills_frame(face, (640, 480))  # the same face in a larger picture
    assert not fills_frame(face.scaled(0.5, 0.5), (256, 256))  # too small for the frame


# ---- the detector ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("onnxruntime")
    from engines.faces import FaceDetector, weights_folder

    try:
        weights_folder()
    except Exception as error:  # noqa: BLE001
        pytest.skip(str(error))
    return FaceDetector()


def test_no_face_in_plain_pictures(detector):
    rng = np.random.default_rng(2)
    assert detector.detect(Image.new("RGB", (320, 240), (128, 128, 128))) == []
    noise = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((640, 480), Image.Resampling.BICUBIC)
    assert detector.detect(noise) == []


@needs_shared
def test_aligned_shared_faces_are_found_and_fill_the_frame(detector):
    from core.images import read_image

    files = sorted((FACES / "real").iterdir())[:4] + sorted((FACES / "fake").iterdir())[:4]
    for path in files:
        image = read_image(path)
        faces = detector.detect(image)
        assert len(faces) == 1, path
        assert fills_frame(faces[0], image.size), path


@needs_shared
def test_found_and_aligned_face_matches_the_ready_crop(detector):
    """A shared face pasted into a larger picture is found and aligned back to (nearly) its own pixels."""
    from core.images import read_image

    face = read_image(sorted((FACES / "real").iterdir())[0])
    scene = Image.new("RGB", (640, 480), (90, 110, 130))
    scene.paste(face, (300, 150))
    found = detector.detect(scene)
    assert len(found) == 1 and not fills_frame(found[0], scene.size)
    direct = detector.detect(face)[0]
    assert np.abs(found[0].landmarks - (direct.landmarks + [300, 150])).max() < 8  # the same landmarks (within a few pixels), moved
    assert abs(found[0].size / direct.size - 1) < 0.05


# Faces per shared photo that the detector must find (counted by eye; docs/faces.md has the table):
# at least this many, and never more than this many plus one.
SHARED_COUNTS = {"dlib_8549b24aaa.jpg": 24, "dlib_a86910ad6e.jpg": 7, "facenet_55e927aaf9.jpg": 6, "deepface_c6b19a34da.jpg": 2, "facerec_e145891ce9.jpg": 1}


@needs_shared
@pytest.mark.parametrize("name", sorted(SHARED_COUNTS))
def test_recall_on_shared_photos(detector, name):
    from core.images import read_image

    faces = detector.detect(read_image(PHOTOS / name))
    assert SHARED_COUNTS[name] <= len(faces) <= SHARED_COUNTS[name] + 1


def test_small_face_and_exif_rotation(detector):
    """A face far under the detector's smallest size is not found; an EXIF-rotated photo is found upright."""
    from core.images import decode_image

    rng = np.random.default_rng(3)
    face = synthetic_face_picture()
    if not detector.detect(face):
        pytest.skip("the drawn face is not a face to MTCNN")
    tiny = Image.new("RGB", (640, 480), (120, 120, 120))
    tiny.paste(face.resize((12, 12)), (300, 200))
    assert detector.detect(tiny) == []
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    face.rotate(90, expand=True).save(buffer, format="JPEG", exif=exif, quality=95)
    upright = decode_image(buffer.getvalue())
    assert upright.size == face.size and len(detector.detect(upright)) == 1
    del rng


def synthetic_face_picture() -> Image.Image:
    """A shared aligned face when there is one, else a drawn one (the test skips if MTCNN disagrees)."""
    from core.images import read_image

    if FACES.is_dir():
        return read_image(sorted((FACES / "real").iterdir())[1])
    from PIL import ImageDraw

    picture = Image.new("RGB", (256, 256), (200, 200, 200))
    draw = ImageDraw.Draw(picture)
    draw.ellipse((60, 40, 196, 220), fill=(224, 172, 140))
    for x in (95, 161):
        draw.ellipse((x - 10, 110, x + 10, 124), fill=(40, 30, 30))
    draw.line((128, 125, 128, 155), fill=(150, 100, 90), width=4)
    draw.arc((100, 170, 156, 200), 0, 180, fill=(120, 40, 40), width=5)
    return picture


@needs_shared
def test_cyborg_data_align_writes_aligned_crops(detector, tmp_path):
    """`cyborg data align` on a two-photo folder: one crop per face, sub-folders kept."""
    from cyborg.cli import main

    source = tmp_path / "photos" / "real"
    source.mkdir(parents=True)
    for name in ("deepface_c6b19a34da.jpg", "facerec_e145891ce9.jpg"):
        (source / name).write_bytes((PHOTOS / name).read_bytes())
    (source / "notes.txt").write_text("not a photo")
    assert main(["data", "align", str(tmp_path / "photos"), str(tmp_path / "out"), "--size", "128"]) == 0
    crops = sorted((tmp_path / "out" / "real").iterdir())
    assert [p.name for p in crops] == ["deepface_c6b19a34da_0.png", "deepface_c6b19a34da_1.png", "facerec_e145891ce9_0.png"]
    assert all(Image.open(p).size == (128, 128) for p in crops)
    assert len(detector.detect(Image.open(crops[0]).convert("RGB"))) == 1  # a crop is one face filling the frame
