"""Calibrated probabilities and operating points through the server, the client and `cyborg detect`."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from cyborg.cli import main
from core import contract as c
from core.thresholds import Calibration
from serving.client import DetectorClient
from serving.proto.cyborg.v1 import detector_pb2 as pb
from serving.proto.cyborg.v1 import detector_pb2_grpc as pb_grpc
from tests.serving_fixtures import RunningServer, random_images, reference_outputs, write_model_version
from tests.test_client import picture

CALIBRATION = Calibration("platt", 0.5, -0.3)
POINTS = {"eer": 0.45, "fpr1": 0.6, "fpr5": 0.5, "default": "fpr1"}


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    write_model_version(root, "tiny", 1, calibration=CALIBRATION.to_dict(), operating_points=POINTS,
                        threshold=CALIBRATION.invert(POINTS["fpr1"]))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def server(repository):
    with RunningServer(repository) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.DetectorStub(channel)


def tensor(image: np.ndarray) -> pb.Tensor:
    return pb.Tensor(shape=image.shape, data=image.tobytes(), dtype="uint8")


def check(answer: pb.DetectResponse, score: float, name: str, probability_threshold: float) -> None:
    assert answer.score == pytest.approx(score, abs=1e-6)
    assert answer.probability == pytest.approx(CALIBRATION.apply(score), abs=1e-6)
    assert (answer.operating_point, answer.probability_threshold) == (name, pytest.approx(probability_threshold))
    assert answer.threshold == pytest.approx(CALIBRATION.invert(probability_threshold), abs=1e-6)
    assert answer.label == ("fake" if answer.probability >= answer.probability_threshold else "real")
    assert answer.label == ("fake" if answer.score >= answer.threshold else "real")  # the raw score tells the same


@pytest.mark.parametrize("choice, name, threshold", [
    ("", "fpr1", 0.6), ("default", "fpr1", 0.6), ("fpr5", "fpr5", 0.5), ("fpr:0.05", "fpr5", 0.5), ("EER", "eer", 0.45),
    ("0.9", "0.9", 0.9), ("0", "0", 0.0), ("1", "1", 1.0),
])  # fmt: skip
def test_detect_at_an_operating_point(stub, repository, choice, name, threshold):
    images = random_images(1, seed=3)
    score = float(reference_outputs(repository / "tiny" / "1", images)[c.SCORE_OUTPUT][0])
    answer = stub.Detect(pb.DetectRequest(tensor=tensor(images[0]), operating_point=choice))
    check(answer, score, name, threshold)
    if choice == "0":
        assert answer.label == "fake"


@pytest.mark.parametrize("choice, message", [
    ("bogus", "has eer, fpr1, fpr5"), ("fpr:0.02", "has eer, fpr1, fpr5"), ("1.5", "in [0, 1]"), ("nan", "in [0, 1]"), ("-1", "in [0, 1]"),
])  # fmt: skip
def test_bad_operating_points_are_invalid_arguments(stub, choice, message):
    image = random_images(1)[0]
    with pytest.raises(grpc.RpcError) as raised:
        stub.Detect(pb.DetectRequest(tensor=tensor(image), operating_point=choice), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in raised.value.details()
    batch = stub.DetectBatch(pb.DetectBatchRequest(requests=[
        pb.DetectRequest(tensor=tensor(image), operating_point=choice), pb.DetectRequest(tensor=tensor(image), operating_point="fpr5"),
    ]))  # fmt: skip
    assert batch.responses[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and message in batch.responses[0].error.message
    assert not batch.responses[1].HasField("error") and batch.responses[1].operating_point == "fpr5"


def test_batch_and_stream_honour_each_items_point(stub, repository):
    images = random_images(4, seed=5)
    scores = reference_outputs(repository / "tiny" / "1", images)[c.SCORE_OUTPUT]
    choices = [("", "fpr1", 0.6), ("eer", "eer", 0.45), ("0.2", "0.2", 0.2), ("0.99", "0.99", 0.99)]
    requests = [pb.DetectRequest(tensor=tensor(image), operating_point=choice, id=str(i)) for i, (image, (choice, _, _)) in enumerate(zip(images, choices))]
    batch = stub.DetectBatch(pb.DetectBatchRequest(requests=requests)).responses
    streamed = list(stub.DetectStream(iter(requests)))
    for answers in (batch, streamed):
        for answer, score, (_, name, threshold) in zip(answers, scores, choices):
            check(answer, float(score), name, threshold)


def test_model_info_lists_the_points(stub, server):
    info = stub.GetModel(pb.GetModelRequest(model="tiny"))
    assert dict(info.operating_points) == pytest.approx({"eer": 0.45, "fpr1": 0.6, "fpr5": 0.5})
    assert (info.default_operating_point, info.calibration) == ("fpr1", "platt")
    with DetectorClient(server.address, timeout=20) as client:
        model = client.get_model("tiny")
        assert model["default_operating_point"] == "fpr1" and model["calibration"] == "platt"
        assert model["contract"]["operating_points"] == POINTS
        result = client.detect(picture(1), operating_point=0.5)
        assert result.operating_point == "0.5" and result.probability == pytest.approx(CALIBRATION.apply(result.score), abs=1e-6)


def test_cyborg_detect_operating_point(server, tmp_path, capsys):
    image = tmp_path / "face.png"
    image.write_bytes(picture(1))
    assert main(["detect", str(image), "--server", server.address, "--operating-point", "fpr5", "--json", "--input-kind", "aligned"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["operating_point"] == "fpr5" and row["probability_threshold"] == 0.5
    assert row["probability"] == pytest.approx(CALIBRATION.apply(row["score"]), abs=1e-5)
    assert row["label"] == ("fake" if row["probability"] >= 0.5 else "real")
    assert main(["detect", str(image), "--server", server.address, "--input-kind", "aligned"]) == 0
    header, line = capsys.readouterr().out.strip().splitlines()
    assert line.split()[4] == "fpr1"
    for bad, message in (("bogus", "has eer, fpr1, fpr5"), ("1.5", "in [0, 1]")):
        assert main(["detect", str(image), "--server", server.address, "--operating-point", bad]) == 2
        assert message in capsys.readouterr().err
