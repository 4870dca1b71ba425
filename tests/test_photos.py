"""Detect on photos through a real server: every face found, aligned and scored (issue 13).

Scenes are built here from the shared aligned faces (../shared/data/faces; skipped without them)
pasted on plain backgrounds, so positions are known: two faces, no face, a face under the smallest
size, thirty faces over the face limit, an EXIF-rotated photo; and the CLI's rows, JSON and picture.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from cyborg.cli import main
from serving.client import DetectorClient
from tests.serving_fixtures import RunningServer, build_model_repository
from tests.test_faces import FACES

def detector_missing() -> str:
    """Why the face detector cannot run here ("" when it can)."""
    try:
        from engines.faces import weights_folder

        weights_folder()
    except Exception as error:  # noqa: BLE001
        return str(error)
    return ""


pytestmark = [
    pytest.mark.skipif(not FACES.is_dir(), reason="../shared/data/faces is not here (scenes are built from its faces)"),
    pytest.mark.skipif(bool(detector_missing()), reason=detector_missing() or "-"),
]
MAX_FACES = 8


def face(index: int, side: int = 256) -> Image.Image:
    from core.images import read_image

    folder = FACES / ("real" if index % 2 else "fake")
    picture = read_image(sorted(folder.iterdir())[index // 2])
    return picture if side == 256 else picture.resize((side, side), Image.Resampling.BILINEAR)


def scene(places: list[tuple[int, int, int]], size=(800, 600)) -> Image.Image:
    """A plain picture with shared faces pasted at (x, y, side)."""
    picture = Image.new("RGB", size, (70, 95, 120))
    for index, (x, y, side) in enumerate(places):
        picture.paste(face(index, side), (x, y))
    return picture


def jpeg(picture: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=92, **options)
    return buffer.getvalue()


TWO = [(40, 60, 256), (480, 250, 200)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = build_model_repository(tmp_path_factory.mktemp("repo"), name="tiny", versions=(1,), size=32)
    with RunningServer(repository, max_faces=MAX_FACES, min_face=64) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with DetectorClient(server.address, timeout=60) as detector:
        yield detector


def centre(box) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def test_default_input_is_still_scored_whole(client):
    result = client.detect(jpeg(scene(TWO)))
    assert result.input_kind == "aligned" and result.status == "aligned" and result.faces == [] and result.label in ("real", "fake")


def test_every_face_of_a_photo_is_scored_and_the_verdict_is_the_most_suspicious(client):
    result = client.detect(jpeg(scene(TWO)), input_kind="photo", heatmap="grid")
    assert result.input_kind == "photo" and result.status == "faces" and len(result.faces) == 2
    for (x, y, side), found in zip(TWO, result.faces):  # largest first: the order pasted
        assert np.hypot(*(centre(found["box"]) - [x + side / 2, y + side * 0.55])) < side * 0.15
        assert found["status"] == "scored" and found["label"] in ("real", "fake") and found["cam"].shape == (4, 4)
        assert len(found["landmarks"]) == 5
    verdict = result.faces[result.verdict_face]
    assert verdict["probability"] == max(f["probability"] for f in result.faces)
    assert result.score == pytest.approx(verdict["score"], abs=1e-6) and result.label == verdict["label"]


def test_photo_heatmaps_are_drawn_on_the_whole_photo(client):
    for kind in ("png", "overlay"):
        result = client.detect(jpeg(scene(TWO)), input_kind="photo", heatmap=kind)
        picture = np.asarray(Image.open(io.BytesIO(result.heatmap_png)))
        assert picture.shape[:2] == (600, 800)
        if kind == "png":
            assert picture[5, 5] == 0 and picture[60:316, 40:296].max() > 0  # evidence on the faces only


def test_no_face_is_an_answer_not_an_error(client):
    result = client.detect(jpeg(Image.new("RGB", (640, 480), (120, 130, 140))), input_kind="photo", heatmap="overlay")
    assert result.status == "no_face" and result.label == "no_face" and result.faces == [] and result.verdict_face == -1
    assert result.heatmap_png is None


def test_a_face_under_the_smallest_size_is_reported_not_scored(client):
    result = client.detect(jpeg(scene([(300, 200, 48)])), input_kind="photo")
    assert result.status in ("faces_too_small", "no_face")  # 48 px: found (as too small) or under the detector's own 20-px box
    assert all(f["status"] == "too_small" for f in result.faces)
    if result.faces:
        assert result.label == "no_face"


def test_thirty_faces_over_the_limit(client):
    places = [(col * 130, row * 130, 128) for row in range(5) for col in range(6)]
    result = client.detect(jpeg(scene(places, size=(780, 650))), input_kind="photo")
    statuses = [f["status"] for f in result.faces]
    assert len(result.faces) >= 27  # recall on 128-px aligned faces
    assert statuses.count("scored") == MAX_FACES and statuses.count("over_limit") == len(result.faces) - MAX_FACES


def test_exif_rotated_photo_gives_upright_boxes(client):
    upright = scene(TWO)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; shown turned 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    rotated = client.detect(jpeg(stored, exif=exif), input_kind="photo")
    plain = client.detect(jpeg(upright), input_kind="photo")
    assert len(rotated.faces) == len(plain.faces) == 2
    for a, b in zip(rotated.faces, plain.faces):
        assert np.abs(np.array(a["box"]) - b["box"]).max() < 12


def test_auto_scores_an_aligned_crop_whole_and_a_photo_per_face(client):
    crop = jpeg(face(0))
    auto, aligned = client.detect(crop, input_kind="auto"), client.detect(crop)
    assert auto.input_kind == "aligned" and auto.score == pytest.approx(aligned.score, abs=1e-6)
    assert client.detect(jpeg(scene(TWO)), input_kind="auto").input_kind == "photo"


def test_faces_from_many_requests_share_batches(server, client):
    """A photo's faces go to the batcher as rows: 8 faces are about 8 inferences in few batches."""
    metrics = server.call(_counts, server)
    client.detect(jpeg(scene([(col * 130, row * 130, 128) for row in range(2) for col in range(4)], size=(540, 280))), input_kind="photo")
    after = server.call(_counts, server)
    rows, batches = after[0] - metrics[0], after[1] - metrics[1]
    assert 6 <= rows <= MAX_FACES and batches <= 2


async def _counts(server):
    registry = server.server.metrics.registry
    sample = {s.name: s.value for m in registry.collect() for s in m.samples if s.labels.get("model") == "tiny"}
    return sample.get("cyborg_inference_count_total", 0), sample.get("cyborg_inference_exec_count_total", 0)


def test_cli_rows_json_and_picture(server, tmp_path, capsys):
    path = tmp_path / "two.jpg"
    path.write_bytes(jpeg(scene(TWO)))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(jpeg(Image.new("RGB", (320, 240), (90, 90, 90))))
    assert main(["detect", str(path), str(empty), "--server", server.address, "--heatmap", str(tmp_path / "cams")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["image", "face", "box"]
    rows = [line.split() for line in out[1:]]
    assert [r[1] for r in rows if r[0] == str(path)] == ["0*", "1"] or [r[1] for r in rows if r[0] == str(path)] == ["0", "1*"]
    assert any(r[0] == str(empty) and "no_face" in r for r in rows)
    drawn = Image.open(tmp_path / "cams" / "two.cam.png")
    assert drawn.size == (800, 600)
    assert main(["detect", str(path), "--server", server.address, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["input_kind"] == "photo" and len(data["faces"]) == 2 and data["verdict_face"] in (0, 1)
