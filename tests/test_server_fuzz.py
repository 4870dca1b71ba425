"""A seeded fuzz corpus against a real server: a few hundred malformed inputs in classes (random
bytes, truncated and bit-flipped images of many formats, decompression-bomb headers, odd modes, bad
tensors, bad names, versions and options, bad Open Inference Protocol requests).

Every answer must be a client-error status (never INTERNAL or UNKNOWN), and after each class the
server must still answer a good request.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.proto.cyborg.v1 import detector_pb2 as pb
from serving.proto.cyborg.v1 import detector_pb2_grpc as pb_grpc
from tests.serving_fixtures import RunningServer, build_model_repository, random_images

SEED = 12
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM", "TGA", "ICO", "JPEG2000")
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def samples(rng: np.random.Generator) -> list[bytes]:
    """One small valid image per format that this Pillow writes."""
    picture = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    out = []
    for fmt in FORMATS:
        try:
            out.append(encoded(picture, fmt))
        except (KeyError, OSError):
            continue
    return out


def png_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + b"\0" * 64


def corpus(rng: np.random.Generator) -> dict[str, list[dict]]:
    valid = samples(rng)
    classes: dict[str, list[dict]] = {}
    classes["random-bytes"] = [dict(image=rng.bytes(int(rng.integers(1, 4096)))) for _ in range(30)]
    classes["truncated"] = [dict(image=data[: int(rng.integers(1, len(data)))]) for data in valid for _ in range(6)]
    flipped = []
    for data in valid:
        for _ in range(6):
            mutable = bytearray(data)
            for offset in rng.integers(0, len(mutable), int(rng.integers(1, 12))):
                mutable[offset] ^= 1 << int(rng.integers(0, 8))
            flipped.append(dict(image=bytes(mutable)))
    classes["bit-flips"] = flipped
    classes["bomb-headers"] = [dict(image=png_claiming(w, h)) for w, h in
                               [(60000, 60000), (8000, 8001), (2**31 - 1, 1), (1, 2**31 - 1), (0, 0), (70000, 10), (10, 70000), (9000, 9000)]]  # fmt: skip
    odd = []
    for mode in ("1", "L", "LA", "P", "I;16", "I", "F", "CMYK", "YCbCr", "RGBA", "La", "PA", "HSV", "LAB"):
        try:
            image = Image.new(mode, (24, 24))
        except ValueError:
            continue
        for fmt in ("PNG", "TIFF", "WEBP", "JPEG", "BMP"):
            try:
                odd.append(dict(image=encoded(image, fmt)))
            except (KeyError, OSError, ValueError):
                continue
    classes["odd-modes"] = odd
    tensors = []
    for _ in range(40):
        rank = int(rng.integers(0, 6))
        shape = [int(rng.choice([0, 1, 3, 8, 32, 2**31, 2**62, -1, -(2**40)])) for _ in range(rank)]
        data = rng.bytes(int(rng.choice([0, 3, 3072, 4096])))
        tensors.append(dict(tensor=pb.Tensor(shape=shape, data=data, dtype=str(rng.choice(["", "uint8", "float32", "x" * 300])))))
    classes["bad-tensors"] = tensors
    good = random_images(1)[0]
    tensor = pb.Tensor(shape=good.shape, data=good.tobytes())
    names = ["m" * 100_000, "é" * 1000, "\x00", "../../etc", "tiny/1", " tiny", "TINY"]
    options = [dict(tensor=tensor, model=name) for name in names]
    options += [dict(tensor=tensor, version=v) for v in (7, 2**62, -1, -(2**62))]
    options += [dict(tensor=tensor, operating_point=p) for p in ("nan", "inf", "-0.1", "1e309", "fpr:2", "x" * 10000, "fpr", "\x00")]
    options += [dict(tensor=tensor, heatmap=h) for h in (4, 99, -1, 2**30)]
    classes["names-and-options"] = options
    return classes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = build_model_repository(tmp_path_factory.mktemp("repo"), versions=(1,))
    with RunningServer(repository) as running:
        yield running


def good_request() -> pb.DetectRequest:
    image = random_images(1, seed=1)[0]
    return pb.DetectRequest(tensor=pb.Tensor(shape=image.shape, data=image.tobytes()), heatmap=pb.HEATMAP_OVERLAY)


def test_detector_fuzz_corpus(server):
    rng = np.random.default_rng(SEED)
    seen = 0
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.DetectorStub(channel)
        for name, inputs in corpus(rng).items():
            for index, fields in enumerate(inputs):
                for heatmap in (pb.HEATMAP_NONE, pb.HEATMAP_OVERLAY):
                    fields.setdefault("heatmap", heatmap)
                    try:
                        stub.Detect(pb.DetectRequest(**fields), timeout=20)
                    except grpc.RpcError as error:
                        assert error.code() not in FORBIDDEN, (name, index, error.code(), error.details())
                        assert len(error.details()) <= 1000, (name, index)
                    seen += 1
                    if fields["heatmap"] != heatmap:
                        break
            assert stub.Detect(good_request(), timeout=20).label, name  # alive after each class
    assert seen >= 300


def test_inference_protocol_fuzz_corpus(server):
    tc = pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    rng = np.random.default_rng(SEED + 1)
    datatypes = ["UINT8", "FP32", "BYTES", "", "uint8", "x" * 500]
    versions = ["", "1", "²", "٣", "9" * 5000, "-1", "0", " 1", "1\x00"]
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for index in range(60):
            request = service_pb2.ModelInferRequest(model_name=str(rng.choice(["tiny", "", "nope", "t" * 50_000])), model_version=str(rng.choice(versions)))
            for _ in range(int(rng.integers(0, 3))):
                shape = [int(rng.choice([-1, 0, 1, 3, 32, 2**40, 2**62])) for _ in range(int(rng.integers(0, 6)))]
                request.inputs.add(name=str(rng.choice(["images", "x", ""])), datatype=str(rng.choice(datatypes)), shape=shape)
                request.raw_input_contents.append(rng.bytes(int(rng.choice([0, 3, 3072, 6144]))))
            if rng.random() < 0.3:
                request.outputs.add(name=str(rng.choice(["score", "cam", "nope"])))
            for call in (stub.ModelInfer, stub.ModelMetadata, stub.ModelReady):
                message = request if call is stub.ModelInfer else (
                    service_pb2.ModelMetadataRequest if call is stub.ModelMetadata else service_pb2.ModelReadyRequest
                )(name=request.model_name, version=request.model_version)  # fmt: skip
                try:
                    call(message, timeout=20)
                except grpc.RpcError as error:
                    assert error.code() not in FORBIDDEN, (index, call, error.code(), error.details())
                    assert len(error.details()) <= 1000
        client = tc.InferenceServerClient(server.address)
        assert client.is_model_ready("tiny")
        client.close()
