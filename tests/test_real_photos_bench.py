"""`python -m benchmarks.real_photos`: real faces in whole photos called fake.

The pure parts (counts at each operating point, Wilson intervals, quantiles, the size split, the
most suspicious faces, the per-version tally) on made-up faces; then the benchmark end to end
against a real server on a tiny model (scenes of shared faces, as tests/test_photos.py builds
them), its numbers checked against the per-face results the client returns.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from benchmarks.real_photos import (
    FaceScore,
    called_fake_at,
    main,
    operating_points,
    quantiles,
    size_split,
    top_faces,
    version_list,
    version_report,
    wilson_interval,
)
from core.contract import ModelContract
from serving.client import Detection, DetectionError


def face(image: str, index: int, probability: float, width: float, height: float = 100.0) -> FaceScore:
    return FaceScore(image, index, (10.0, 20.0, 10.0 + width, 20.0 + height), probability)


# ---- pure parts ------------------------------------------------------------------------------
def test_wilson_interval_known_values():
    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.27753, abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert wilson_interval(3, 86) == pytest.approx((0.011934, 0.097609), abs=1e-6)  # not symmetric about 3/86


def test_wilson_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 1), (1, 7), (3, 86), (40, 41), (250, 1000)]:
        expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_called_fake_counts_a_probability_at_the_threshold_as_fake():
    faces = [face("a", i, p, 50) for i, p in enumerate([0.1, 0.5, 0.49999, 0.9, 0.6])]
    rows = called_fake_at(faces, {"eer": 0.5, "fpr1": 0.9, "fpr5": 0.95})
    assert {name: row["called_fake"] for name, row in rows.items()} == {"eer": 3, "fpr1": 1, "fpr5": 0}
    assert rows["eer"]["faces"] == 5 and rows["eer"]["share"] == pytest.approx(0.6)
    assert rows["eer"]["ci95"] == pytest.approx(list(wilson_interval(3, 5)))
    assert rows["fpr5"]["share"] == 0.0 and rows["fpr5"]["ci95"][0] == 0.0 and rows["fpr5"]["threshold"] == 0.95
    empty = called_fake_at([], {"eer": 0.5})["eer"]
    assert empty == {"threshold": 0.5, "called_fake": 0, "faces": 0, "share": None, "ci95": None}


def test_quantiles_interpolate_between_faces():
    assert quantiles([]) is None
    values = quantiles([0.2, 0.9, 0.4, 0.1, 0.6])  # sorted 0.1 0.2 0.4 0.6 0.9
    assert values == pytest.approx({"p10": 0.14, "p50": 0.4, "p90": 0.78})


def test_size_split_uses_the_box_width_not_its_height_or_order():
    # widths 50 60 70 80 200 (median 70); heights and probabilities ordered the other way
    faces = [face("a", 0, 0.95, 200, 10), face("a", 1, 0.2, 50, 300), face("b", 0, 0.3, 80, 20),
             face("b", 1, 0.85, 60, 250), face("c", 0, 0.1, 70, 200)]  # fmt: skip
    split = size_split(faces, {"eer": 0.5})
    assert split["median_width"] == 70.0
    assert split["below"]["faces"] == 2 and split["below"]["width_range"] == [50.0, 60.0]
    assert split["at_or_above"]["faces"] == 3 and split["at_or_above"]["width_range"] == [70.0, 200.0]
    assert split["below"]["operating_points"]["eer"]["called_fake"] == 1  # the 60-px face at 0.85
    assert split["at_or_above"]["operating_points"]["eer"]["called_fake"] == 1  # the 200-px face at 0.95
    assert split["below"]["probability_quantiles"]["p50"] == pytest.approx(0.525)
    assert size_split([], {"eer": 0.5})["median_width"] is None


def test_top_faces_highest_first_ties_by_image_then_face():
    faces = [face("b", 1, 0.7, 50), face("a", 2, 0.7, 60), face("a", 0, 0.99, 70), face("c", 0, 0.1, 80)]
    top = top_faces(faces, 3)
    assert [(f["image"], f["face"], f["probability"]) for f in top] == [("a", 0, 0.99), ("a", 2, 0.7), ("b", 1, 0.7)]
    assert top[0]["box"] == [10.0, 20.0, 80.0, 120.0] and top[0]["width"] == 70.0
    assert len(top_faces(faces, 10)) == 4 and top_faces(faces, 0) == []


def detection(image: str, status: str, faces: list[tuple[str, float, float]]) -> Detection:
    """A photo's result as the client returns it: faces as (status, probability, width)."""
    rows = [{"box": [0.0, 0.0, width, width], "status": s, "probability": p, "label": "", "score": p} for s, p, width in faces]
    return Detection(image=image, score=0.0, label="", threshold=0.5, model="m", version=1, input_kind="photo", status=status, faces=rows)


def test_version_report_counts_images_faces_and_flagged_photos():
    results = [
        detection("one.jpg", "faces", [("scored", 0.9, 120), ("too_small", 0.0, 30), ("scored", 0.2, 80)]),
        detection("two.jpg", "faces", [("scored", 0.55, 100), ("scored", 0.6, 90), ("over_limit", 0.0, 40)]),
        detection("empty.jpg", "no_face", []),
        detection("tiny.jpg", "faces_too_small", [("too_small", 0.0, 20)]),
        DetectionError("bad.jpg", "INVALID_ARGUMENT", "image: not a recognised image format"),
    ]
    report = version_report(results, {"eer": 0.5, "fpr1": 0.85}, "fpr1", show=2)
    assert (report["images"], report["images_no_face"], report["images_faces_too_small"], report["images_failed"]) == (5, 1, 1, 1)
    assert report["faces_scored"] == 4 and report["faces_not_scored"] == {"too_small": 2, "over_limit": 1}
    assert report["operating_points"]["eer"]["called_fake"] == 3 and report["operating_points"]["fpr1"]["called_fake"] == 1
    assert report["images_called_fake"] == {"eer": 2, "fpr1": 1}
    assert [(f["image"], f["face"]) for f in report["top_faces"]] == [("one.jpg", 0), ("two.jpg", 1)]  # indices as the server lists faces
    assert report["by_size"]["median_width"] == 95.0
    assert report["errors"] == [{"image": "bad.jpg", "error": "image: not a recognised image format", "code": "INVALID_ARGUMENT"}]
    assert report["default_operating_point"] == "fpr1"


def contract(**fields) -> ModelContract:
    return ModelContract(name="m", version=1, architecture="a", input_height=32, input_width=32, cam_height=4, cam_width=4,
                         mean=(0.5,) * 3, std=(0.5,) * 3, **({"threshold": 0.5} | fields))  # fmt: skip


def test_operating_points_of_a_contract():
    named = contract(operating_points={"eer": 0.4, "fpr1": 0.9, "fpr5": 0.7, "default": "fpr1"})
    assert operating_points(named) == ({"eer": 0.4, "fpr1": 0.9, "fpr5": 0.7}, "fpr1")
    fixed = contract(operating_points={"eer": 0.4, "fpr1": 0.9, "fpr5": 0.7, "fixed": 0.8, "default": "fixed"})
    assert operating_points(fixed) == ({"eer": 0.4, "fpr1": 0.9, "fpr5": 0.7, "fixed": 0.8}, "fixed")
    assert operating_points(contract(threshold=0.65)) == ({"default": 0.65}, "default")  # before operating points


def test_version_list():
    import argparse

    assert version_list("7,6,7") == [7, 6]
    for text in ("", "6,x", "0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            version_list(text)


def test_folder_without_images_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no photos here")
    assert main([str(tmp_path), "--address", "127.0.0.1:1"]) == 2
    assert f"{tmp_path}: no images" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--address", "127.0.0.1:1"]) == 2
    assert "not a folder" in capsys.readouterr().err


# ---- end to end ------------------------------------------------------------------------------
V1_THRESHOLD = 0.7  # v1: a model.json from before operating points (its one threshold)
V2_POINTS = {"eer": 0.5, "fpr1": 0.9, "fpr5": 0.8}  # v2: named points on a temperature-calibrated probability


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from tests.test_photos import FACES, detector_missing, jpeg, scene

    if not FACES.is_dir() or detector_missing():
        pytest.skip(detector_missing() or "../shared/data/faces is not here (scenes are built from its faces)")
    folder = tmp_path_factory.mktemp("photos")
    (folder / "more").mkdir()
    pictures = {
        "two.jpg": scene([(40, 60, 256), (480, 250, 200)]),
        "more/four.jpg": scene([(20, 20, 300), (400, 40, 150), (420, 330, 120), (620, 300, 170)]),
        "empty.jpg": Image.new("RGB", (640, 480), (120, 130, 140)),
        "more/one.jpg": scene([(100, 100, 220)], size=(500, 400)),
    }
    for name, picture in pictures.items():
        (folder / name).write_bytes(jpeg(picture))
    return folder


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    from tests.serving_fixtures import write_model_version

    root = tmp_path_factory.mktemp("repo")
    write_model_version(root, "tiny", 1, size=32, threshold=V1_THRESHOLD)
    write_model_version(root, "tiny", 2, size=32, calibration={"method": "temperature", "temperature": 0.5},
                        operating_points=V2_POINTS | {"default": "fpr1"})  # fmt: skip
    return root


@pytest.fixture(scope="module")
def server(photos, repository):
    from tests.serving_fixtures import RunningServer

    with RunningServer(repository, version_policy="1,2") as running:
        yield running


def test_benchmark_reports_what_the_client_sees(server, photos, tmp_path, capsys):
    from serving.client import DetectorClient

    out = tmp_path / "report.json"
    assert main([str(photos), "--address", server.address, "--versions", "2,1", "--show", "3", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["images"] == 4 and list(report["versions"]) == ["2", "1"]
    assert "tiny v2" in table and "tiny v1" in table and "fpr1*" in table

    paths = sorted(str(p) for p in photos.rglob("*.jpg"))
    expected_points = {1: {"default": V1_THRESHOLD}, 2: V2_POINTS}
    nontrivial = 0
    with DetectorClient(server.address) as client:
        for version, points in expected_points.items():
            row = report["versions"][str(version)]
            results = {path: client.detect(path, version=version, input_kind="photo") for path in paths}
            faces = [(path, i, f) for path, r in results.items() for i, f in enumerate(r.faces) if f["status"] == "scored"]
            probabilities = np.array([f["probability"] for _, _, f in faces])
            assert row["precision"] == "fp32" and f"tiny v{version} ({row['architecture']}, fp32)" in table
            assert row["images"] == 4 and row["images_no_face"] == sum(r.status == "no_face" for r in results.values()) == 1
            assert row["faces_scored"] == len(faces) == 7 and row["images_failed"] == 0
            assert {name: p["threshold"] for name, p in row["operating_points"].items()} == pytest.approx(points)
            for name, threshold in points.items():
                k = int((probabilities >= threshold).sum())
                point = row["operating_points"][name]
                assert point["called_fake"] == k and point["share"] == pytest.approx(k / 7)
                assert point["ci95"] == pytest.approx(list(wilson_interval(k, 7)))
                assert row["images_called_fake"][name] == len({path for path, _, f in faces if f["probability"] >= threshold})
                nontrivial += 0 < k < 7
            default = row["operating_points"][row["default_operating_point"]]
            assert default["called_fake"] == sum(f["label"] == "fake" for _, _, f in faces)  # the server's own labels agree
            assert row["probability_quantiles"] == pytest.approx(dict(zip(("p10", "p50", "p90"), np.percentile(probabilities, [10, 50, 90]))))
            widths = np.array([f["box"][2] - f["box"][0] for _, _, f in faces])
            median = float(np.median(widths))
            assert row["by_size"]["median_width"] == pytest.approx(median)
            assert row["by_size"]["below"]["faces"] == int((widths < median).sum()) == 3
            for name, threshold in points.items():
                big = int(((widths >= median) & (probabilities >= threshold)).sum())
                assert row["by_size"]["at_or_above"]["operating_points"][name]["called_fake"] == big
            ranked = sorted(faces, key=lambda t: -t[2]["probability"])[:3]
            assert [(f["image"], f["face"], f["box"]) for f in row["top_faces"]] == [(p, i, f["box"]) for p, i, f in ranked]
            assert [f["probability"] for f in row["top_faces"]] == [f["probability"] for _, _, f in ranked]
    assert nontrivial >= 2  # thresholds that split the faces, so a wrong count shows


def test_version_not_served_names_the_served_versions(server, photos, capsys):
    assert main([str(photos), "--address", server.address, "--versions", "1,3"]) == 2
    assert "version 3 is not served (serving versions 2, 1)" in capsys.readouterr().err


def test_unreachable_address(photos, capsys):
    from benchmarks.serve import free_port

    assert main([str(photos), "--address", f"127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err


def test_starts_its_own_server_with_the_versions_asked_for(server, photos, repository, tmp_path, capsys):
    """Without --address: `cyborg serve --version-policy 2` as a subprocess; the same figures as above."""
    out, given = tmp_path / "own.json", tmp_path / "given.json"
    assert main([str(photos), "--model-repository", str(repository), "--versions", "2", "--json", str(out)]) == 0
    assert main([str(photos), "--address", server.address, "--versions", "2", "--json", str(given)]) == 0
    own, reference = json.loads(out.read_text()), json.loads(given.read_text())
    assert own["server"] == f"cyborg serve --model-repository {repository} --version-policy 2"
    assert own["versions"] == reference["versions"]
    assert main([str(photos), "--model-repository", str(repository), "--versions", "8,9"]) == 2  # refused before starting
    assert "none of them is in" in capsys.readouterr().err
