"""The Python client and `cyborg detect`, end to end against a real server on a loopback port."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import threading

import numpy as np
import pytest
from PIL import Image

from cyborg.cli import main
from core import contract as c
from serving.client import ClientError, Detection, DetectionError, DetectorClient
from core.images import decode_image, to_model_input
from tests.serving_fixtures import RunningServer, build_model_repository, reference_outputs

SIZE = 32


def picture(seed: int, width: int = 48, height: int = 40, fmt: str = "PNG") -> bytes:
    """A small encoded image with content that differs per seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def expected_score(repository, data: bytes) -> float:
    pixels = to_model_input(decode_image(data), SIZE, SIZE)[None]
    return float(reference_outputs(repository / "tiny" / "1", pixels)[c.SCORE_OUTPUT][0])


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return build_model_repository(tmp_path_factory.mktemp("repo"), name="tiny", versions=(1,), size=SIZE)


@pytest.fixture(scope="module")
def server(repository):
    with RunningServer(repository) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with DetectorClient(server.address, timeout=20) as detector:
        yield detector


@pytest.fixture
def files(tmp_path):
    """Two good images, a text file, and a missing path."""
    good = [tmp_path / "face-a.png", tmp_path / "sub" / "face-b.jpg"]
    good[1].parent.mkdir()
    good[0].write_bytes(picture(1))
    good[1].write_bytes(picture(2, 64, 64, "JPEG"))
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all")
    return {"good": good, "text": text, "missing": tmp_path / "missing.png"}


# ---- the client ---------------------------------------------------------------------------------
def test_detect_path_bytes_and_array_agree_with_onnxruntime(client, repository, files):
    path = files["good"][0]
    data = path.read_bytes()
    by_path = client.detect(path)
    assert isinstance(by_path, Detection) and by_path.image == str(path)
    assert (by_path.model, by_path.version) == ("tiny", 1)
    assert by_path.score == pytest.approx(expected_score(repository, data), abs=1e-5)
    assert by_path.label == ("fake" if by_path.score >= by_path.threshold else "real")
    assert client.detect(data).score == pytest.approx(by_path.score, abs=1e-6)
    pixels = np.asarray(decode_image(data))
    assert client.detect(pixels).score == pytest.approx(by_path.score, abs=1e-6)  # [H, W, 3]
    assert client.detect(pixels.transpose(2, 0, 1).copy(), model="tiny", version=1).score == pytest.approx(by_path.score, abs=1e-6)
    assert by_path.timings["total_ms"] > 0


def test_heatmaps_grid_and_overlay(client):
    data = picture(3, 56, 40)
    grid = client.detect(data, heatmap="grid")
    assert grid.cam.shape == (SIZE // 8, SIZE // 8) and 0.0 <= grid.cam.min() and grid.cam.max() <= 1.0
    overlay = client.detect(data, heatmap="overlay")
    with Image.open(io.BytesIO(overlay.heatmap_png)) as image:
        assert image.format == "PNG" and image.size == (56, 40)


def test_batch_reports_a_bad_item_in_its_place(client, repository, files):
    good = [p.read_bytes() for p in files["good"]]
    results = client.detect_batch([good[0], b"plain text, not an image", good[1]])
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1], DetectionError) and results[1].code == "INVALID_ARGUMENT"
    assert "not a recognised image format" in results[1].message
    for result, data in zip([results[0], results[2]], good):
        assert result.score == pytest.approx(expected_score(repository, data), abs=1e-5)


def test_stream_yields_every_result_in_order(client, repository):
    pictures = [picture(10 + i) for i in range(6)]
    pictures.insert(3, b"")
    results = list(client.stream(iter(pictures)))
    assert [r.image for r in results] == [f"#{i}" for i in range(7)]
    assert not results[3].ok and "empty" in results[3].message
    for result, data in zip(results[:3] + results[4:], pictures[:3] + pictures[4:]):
        assert result.score == pytest.approx(expected_score(repository, data), abs=1e-5)


def test_models_and_contract(client):
    models, default = client.list_models()
    assert default == "tiny" and [(m["name"], m["version"]) for m in models] == [("tiny", 1)]
    info = client.get_model("tiny")
    assert info["contract"]["name"] == "tiny" and info["input_height"] == SIZE and info["cam_width"] == SIZE // 8
    with pytest.raises(ClientError) as caught:
        client.get_model("no-such-model")
    assert caught.value.code.name == "NOT_FOUND"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_retries_while_unavailable_then_succeeds(repository):
    port = free_port()
    late = RunningServer(repository, port=port)
    starter = threading.Timer(0.4, late.start)
    starter.start()
    try:
        with DetectorClient(f"127.0.0.1:{port}", retries=8, backoff=0.1, timeout=10) as detector:
            assert detector.detect(picture(4)).model == "tiny"
    finally:
        starter.join()
        late.stop(0)
    with DetectorClient(f"127.0.0.1:{free_port()}", retries=1, backoff=0.01, timeout=2) as nobody:
        with pytest.raises(ClientError) as caught:
            nobody.detect(picture(4))
    assert caught.value.code.name == "UNAVAILABLE"


def test_token_and_tls(repository, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    with RunningServer(repository, tls_cert=str(cert), tls_key=str(key), auth_token_file=str(tokens)) as secured:
        with DetectorClient(secured.address, tls_ca=cert, token="s3cret", timeout=10) as detector:
            assert detector.detect(picture(5)).model == "tiny"
        with DetectorClient(secured.address, tls_ca=cert, token="wrong", retries=0, timeout=10) as detector:
            with pytest.raises(ClientError) as caught:
                detector.detect(picture(5))
            assert caught.value.code.name == "UNAUTHENTICATED"
        token_file = tmp_path / "token"
        token_file.write_text("s3cret\n")
        image = tmp_path / "x.png"
        image.write_bytes(picture(5))
        assert main(["detect", str(image), "--server", f"localhost:{secured.port}", "--tls-ca", str(cert), "--token-file", str(token_file), "--json"]) == 0


# ---- cyborg detect --------------------------------------------------------------------------------
def test_detect_table(server, repository, files, capsys):
    assert main(["detect", *map(str, files["good"]), "--server", server.address, "--input-kind", "aligned"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["image", "score", "probability", "label", "point", "model", "version"]
    for line, path in zip(lines[1:], files["good"]):
        image, score, probability, label, point, model, version = line.split()
        assert image == str(path) and (model, version) == ("tiny", "1") and label in ("real", "fake")
        assert float(score) == pytest.approx(expected_score(repository, path.read_bytes()), abs=1e-4)
        assert probability == score and point == "default"  # a model.json without calibration: the score itself


def test_detect_json_heatmaps_and_per_image_errors(server, files, tmp_path, capsys):
    out = tmp_path / "cams"
    names = [files["good"][0], files["text"], files["missing"], files["good"][1]]
    code = main(["detect", *map(str, names), "--server", server.address, "--model", "tiny", "--heatmap", str(out), "--json", "--input-kind", "aligned"])
    assert code == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["image"] for row in rows] == [str(n) for n in names]
    good, text, missing = rows[0], rows[1], rows[2]
    assert {"image", "score", "probability", "label", "operating_point", "model", "version", "heatmap"} <= set(good)
    assert good["probability"] == good["score"] and good["operating_point"] == "default"
    assert (good["model"], good["version"]) == ("tiny", 1) and 0.0 <= good["score"] <= 1.0
    assert text["code"] == "INVALID_ARGUMENT" and "not a recognised image format" in text["error"]
    assert missing["code"] == "NOT_FOUND" and "missing.png" in missing["error"]
    written = sorted(p.name for p in out.iterdir())
    assert written == ["face-a.cam.png", "face-b.cam.png"] and rows[3]["heatmap"] == str(out / "face-b.cam.png")
    with Image.open(out / "face-b.cam.png") as overlay:
        assert overlay.size == (64, 64) and overlay.mode == "RGB"


def test_detect_server_down_is_one_clear_error(files, capsys):
    code = main(["detect", str(files["good"][0]), "--server", f"127.0.0.1:{free_port()}", "--timeout", "2"])
    assert code == 2
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_detect_unknown_model_reports_each_image(server, files, capsys):
    assert main(["detect", str(files["good"][0]), "--server", server.address, "--model", "nope", "--json"]) == 1
    row = json.loads(capsys.readouterr().out)
    assert row["code"] == "NOT_FOUND" and "nope" in row["error"]
