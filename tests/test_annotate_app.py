"""The `cyborg annotate` web app over HTTP (aiohttp's test client): the API, the guard (loopback Host,
token, CSRF header, origin), only the data set's images served, upload limits, and the check page as a
client of a real gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("aiohttp", reason="the annotate extra (aiohttp) is not installed: pip install -e '.[annotate]'")
from aiohttp import FormData  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from annotate.app import MAX_REQUEST_BYTES, AppConfig, PhotoChecker, create_app  # noqa: E402
from core.errors import UserError  # noqa: E402
from cyborg.cli import main  # noqa: E402
from tests.datasets import make_plain_dataset  # noqa: E402
from training.annotations import Session  # noqa: E402

SIZE = 32
POST = {"X-Requested-With": "cyborg"}


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def session(tmp_path):
    data = make_plain_dataset(tmp_path, n_real=2, n_fake=2, size=SIZE, maps=False)
    (data / "secret.txt").write_text("not an image")
    return Session.create_or_open(tmp_path / "session", data, seed=0)


def serve(config: AppConfig, scenario):
    """Run `await scenario(client)` against the app on a loopback port."""

    async def main_():
        async with TestClient(TestServer(create_app(config), host="127.0.0.1")) as client:
            return await scenario(client)

    return asyncio.run(main_())


def answer_form(state, decision="fake", mask=None, **change):
    item = state["item"]
    fields = {"annotator": "alice", "position": str(item["position"]), "image": item["image"], "decision": decision, "time_ms": "1234"}
    fields.update(change)
    form = FormData()
    for key, value in fields.items():
        form.add_field(key, value)
    if mask is None:
        mask = np.zeros((item["height"], item["width"]), np.uint8)
        mask[2:6, 2:6] = 255
    form.add_field("mask", mask if isinstance(mask, bytes) else png(mask), filename="mask.png", content_type="image/png")
    return form


def test_annotate_judge_and_resume(session):
    async def scenario(client):
        page = await client.get("/")
        assert page.status == 200 and "cyborg annotate" in await page.text()
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        config = await (await client.get("/api/config")).json()
        assert config == {"show_label": False, "repeats": 1, "images": 4, "check": False}
        state = await (await client.get("/api/next", params={"annotator": "alice"})).json()
        assert (state["done"], state["total"], state["finished"]) == (0, 4, False) and "label" not in state["item"]
        image = await client.get(state["item"]["url"])
        assert image.status == 200 and image.content_type == "image/png"
        saved = await client.post("/api/answer", data=answer_form(state), headers=POST)
        body = await saved.json()
        assert saved.status == 200, body
        assert body["saved"]["marked_fraction"] == pytest.approx(16 / SIZE**2) and body["next"]["done"] == 1
        again = await client.post("/api/answer", data=answer_form(state), headers=POST)
        assert again.status == 409 and (await again.json())["next"]["item"]["position"] == 1
        resumed = await (await client.get("/api/next", params={"annotator": "alice"})).json()
        assert resumed["done"] == 1 and resumed["item"]["position"] == 1

    serve(AppConfig(session), scenario)
    answer = session.log("alice").answers()[0]
    assert answer["decision"] == "fake" and answer["time_ms"] == 1234


def test_only_the_data_sets_images_are_served(session):
    async def scenario(client):
        for path in ("/api/image/../../session.json", "/api/image/%2e%2e%2fsecret.txt", "/api/image/secret.txt",
                     "/api/image/0123456789abcdef", "/static/../app.py", "/static/annotate.html", "/static/%2e%2e/app.py"):  # fmt: skip
            response = await client.get(path)
            assert response.status == 404, path

    serve(AppConfig(session), scenario)


@pytest.mark.parametrize(
    "change, status, message",
    [
        ({"decision": "unsure"}, 400, "decision"),
        ({"annotator": "../../etc"}, 400, "annotator name"),
        ({"position": "x"}, 400, "position"),
        ({"mask": png(np.zeros((SIZE, SIZE + 2), np.uint8))}, 400, "34x32, the image is 32x32"),
        ({"mask": b"<svg/>"}, 400, "not a PNG"),
    ],
)
def test_bad_uploads_are_refused(session, change, status, message):
    async def scenario(client):
        state = await (await client.get("/api/next", params={"annotator": "alice"})).json()
        response = await client.post("/api/answer", data=answer_form(state, **change), headers=POST)
        assert response.status == status and message in (await response.json())["error"]

    serve(AppConfig(session), scenario)
    assert session.log("alice").answers() == []


def test_oversized_upload_is_refused(session):
    async def scenario(client):
        state = await (await client.get("/api/next", params={"annotator": "alice"})).json()
        response = await client.post("/api/answer", data=answer_form(state, mask=b"\x89PNG\r\n\x1a\n" + bytes(MAX_REQUEST_BYTES)), headers=POST)
        assert response.status == 413

    serve(AppConfig(session), scenario)


def test_guard_csrf_origin_host_and_token(session):
    async def scenario(client):
        state = await (await client.get("/api/next", params={"annotator": "alice"})).json()
        assert (await client.post("/api/answer", data=answer_form(state))).status == 403  # no X-Requested-With
        cross = await client.post("/api/answer", data=answer_form(state), headers={**POST, "Origin": "http://evil.example"})
        assert cross.status == 403
        rebinding = await client.get("/api/config", headers={"Host": "evil.example:8080"})
        assert rebinding.status == 421

    serve(AppConfig(session), scenario)

    token = "t0ken-t0ken-t0ken-t0ken"

    async def with_token(client):
        assert (await client.get("/api/config")).status == 401
        assert (await client.get("/api/config", headers={"Authorization": "Bearer wrong"})).status == 401
        assert (await client.get("/api/config", headers={"Authorization": f"Bearer {token}"})).status == 200
        link = await client.get(f"/?token={token}&annotator=alice", allow_redirects=False)
        assert link.status == 303 and link.headers["Location"] == "/?annotator=alice"
        assert "HttpOnly" in link.headers["Set-Cookie"] and "SameSite=Strict" in link.headers["Set-Cookie"]
        assert (await client.get("/api/config")).status == 200  # the cookie now carries it
        assert (await client.get("/api/config", headers={"Host": "annotate.lan:8080"})).status == 200  # on a network, any Host

    serve(AppConfig(session, token=token, loopback_only=False), with_token)


def test_network_host_needs_a_token(tmp_path, session, capsys):
    args = ["annotate", str(session.data), "--out", str(session.root), "--host", "0.0.0.0"]
    assert main(args) == 2
    assert "needs --app-token-file" in capsys.readouterr().err
    short = tmp_path / "short"
    short.write_text("abc\n")
    assert main([*args, "--app-token-file", str(short)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err


# ---- the check page: a client of the gRPC server --------------------------------------------------
@pytest.fixture(scope="module")
def grpc_server(tmp_path_factory):
    pytest.importorskip("onnx", reason="onnx builds the tiny test model")
    from tests.serving_fixtures import RunningServer, build_model_repository

    repository = build_model_repository(tmp_path_factory.mktemp("repo"), name="tiny", versions=(1,), size=SIZE)
    with RunningServer(repository) as running:
        yield running


def photo_bytes(seed=0, fmt="PNG") -> bytes:
    array = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_check_a_photo_through_the_server(session, grpc_server):
    checker = PhotoChecker(grpc_server.address, timeout=20, input_kind="aligned")

    async def scenario(client):
        assert (await (await client.get("/api/config")).json())["check"] is True
        form = FormData()
        form.add_field("image", photo_bytes(), filename="face.png", content_type="image/png")
        response = await client.post("/api/check", data=form, headers=POST)
        body = await response.json()
        assert response.status == 200, body
        assert body["label"] in ("real", "fake") and 0 <= body["probability"] <= 1 and body["model"] == "tiny"
        assert body["heatmap"].startswith("data:image/png;base64,")
        bad = FormData()
        bad.add_field("image", b"not an image", filename="x.png", content_type="image/png")
        refused = await client.post("/api/check", data=bad, headers=POST)
        assert refused.status == 400 and "INVALID_ARGUMENT" in (await refused.json())["error"]

    try:
        serve(AppConfig(session, checker=checker), scenario)
    finally:
        checker.close()


def test_check_a_photo_without_a_face(grpc_server):
    with contextlib.closing(PhotoChecker(grpc_server.address, timeout=20)) as checker:  # input kind auto, as cyborg detect
        answer = checker(photo_bytes())
    assert answer["input_kind"] == "photo" and answer["status"] == "no_face" and answer["faces"] == []


def test_check_page_off_without_a_server_and_unreachable_server_is_clear(session):
    async def off(client):
        form = FormData()
        form.add_field("image", photo_bytes(), filename="face.png")
        assert (await client.post("/api/check", data=form, headers=POST)).status == 404

    serve(AppConfig(session), off)
    checker = PhotoChecker("127.0.0.1:1", timeout=2)
    with pytest.raises(UserError, match="UNAVAILABLE"):
        checker(photo_bytes())
    checker.close()


def test_the_command_serves_until_sigterm_then_merges(tmp_path):
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    data = make_plain_dataset(tmp_path, n_real=1, n_fake=1, size=SIZE, maps=False)
    command = [sys.executable, "-m", "cyborg.cli", "annotate", str(data), "--out", str(tmp_path / "s"), "--port", "0", "--maps", str(tmp_path / "maps")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        url = re.search(r"open (http://\S+)", lines[1]).group(1)
        with urllib.request.urlopen(url + "api/config", timeout=10) as response:
            assert response.status == 200 and b'"images": 2' in response.read()
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert "images: 0 of 2 done" in output and (tmp_path / "maps" / "PROVENANCE.json").is_file()
