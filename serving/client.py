"""The Python client for cyborg's Detector API (`cyborg.v1.Detector`).

    with DetectorClient("localhost:8001") as client:
        result = client.detect("face.jpg", heatmap="overlay", operating_point="fpr1")
        print(result.probability, result.label)
        Path("face.cam.png").write_bytes(result.heatmap_png)

Images go as encoded bytes (a path or bytes) or as uint8 RGB arrays ([3,H,W] or [H,W,3]); the
server decodes and resizes. TLS (server CA, optional client certificate for mutual TLS) and a
bearer token are options; unary calls are retried with exponential backoff while the server
answers UNAVAILABLE (starting, reloading, restarting). A failed item of a batch or stream comes
back as a `DetectionError` in its place, never as an exception that hides the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import grpc
import numpy as np

from serving.proto.cyborg.v1 import detector_pb2 as pb
from serving.proto.cyborg.v1 import detector_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "localhost:8001"
DETECT_METHOD = "/cyborg.v1.Detector/Detect"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HEATMAPS = {
    "none": pb.HEATMAP_NONE,
    "grid": pb.HEATMAP_GRID,
    "png": pb.HEATMAP_PNG,
    "overlay": pb.HEATMAP_OVERLAY,
}
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)

ImageInput = Union[str, os.PathLike, bytes, np.ndarray]


@dataclasses.dataclass
class Detection:
    """One image's result."""

    image: str  # the path, or "#<index>" for bytes and arrays
    score: float  # the model's raw fake score
    label: str  # "fake" or "real" at the operating point (probability >= probability_threshold)
    threshold: float  # the operating point's threshold on the raw score
    model: str
    version: int
    probability: float = 0.0  # the calibrated probability that the image is fake
    operating_point: str = ""  # the operating point used ("fpr1", "default", "0.7", ...)
    probability_threshold: float = 0.0  # its threshold on the probability
    cam: np.ndarray | None = None  # heatmap="grid": float32 [h, w] in [0, 1]
    heatmap_png: bytes | None = None  # heatmap="png" or "overlay"
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    input_kind: str = "aligned"  # how the server scored it: aligned (whole picture) or photo (per face)
    status: str = "aligned"  # aligned | faces | no_face | faces_too_small
    faces: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # photo: box, landmarks, confidence, status, score, probability, label[, cam]
    verdict_face: int = -1  # photo: index in faces of the most suspicious face (-1: none)
    ok: bool = dataclasses.field(default=True, init=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (no heatmap bytes)."""
        fields = ("image", "score", "probability", "label", "operating_point", "threshold", "probability_threshold", "model", "version")
        data = {k: getattr(self, k) for k in fields}
        for key in ("score", "probability", "threshold", "probability_threshold"):
            data[key] = round(data[key], 6)
        if self.cam is not None:
            data["cam"] = np.round(self.cam, 4).tolist()
        if self.input_kind == "photo":
            faces = [{k: (np.round(v, 4).tolist() if isinstance(v, np.ndarray) else v) for k, v in face.items()} for face in self.faces]
            data |= {"input_kind": "photo", "status": self.status, "verdict_face": self.verdict_face, "faces": faces}
        return data | {"timings_ms": {k: round(v, 3) for k, v in self.timings.items()}}


@dataclasses.dataclass
class DetectionError:
    """One image that failed; the others in the same call are unaffected."""

    image: str
    code: str  # a grpc.StatusCode name, e.g. "INVALID_ARGUMENT"
    message: str
    ok: bool = dataclasses.field(default=False, init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "error": self.message, "code": self.code}


class ClientError(Exception):
    """A call that failed as a whole (server unreachable, unauthenticated, ...)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code


def max_message_options(limit: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel options raising gRPC's 4 MiB default limits."""
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def image_name(image: ImageInput, index: int) -> str:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"#{index}"


INPUT_KINDS = {"aligned": pb.INPUT_KIND_ALIGNED, "photo": pb.INPUT_KIND_PHOTO, "auto": pb.INPUT_KIND_AUTO}
FACE_STATUS_NAMES = {pb.FACE_SCORED: "scored", pb.FACE_TOO_SMALL: "too_small", pb.FACE_OVER_LIMIT: "over_limit"}
IMAGE_STATUS_NAMES = {pb.IMAGE_STATUS_ALIGNED: "aligned", pb.IMAGE_STATUS_FACES: "faces", pb.IMAGE_STATUS_NO_FACE: "no_face",
                      pb.IMAGE_STATUS_FACES_TOO_SMALL: "faces_too_small"}  # fmt: skip


def detect_request(
    image: ImageInput, model: str = "", version: int = 0, heatmap: str = "none", id: str = "", operating_point: str | float = "",
    input_kind: str = "",
) -> pb.DetectRequest:
    """The DetectRequest for a path, encoded bytes, or a uint8 RGB array; `operating_point` is a name
    the model records ("eer", "fpr1", "fpr5"), a threshold in [0, 1], or "" for the model's default;
    `input_kind` aligned, photo, auto, or "" (the server's default: aligned)."""
    if heatmap not in HEATMAPS:
        raise ValueError(f"heatmap {heatmap!r}: one of {', '.join(HEATMAPS)}")
    if input_kind and input_kind not in INPUT_KINDS:
        raise ValueError(f"input kind {input_kind!r}: one of {', '.join(INPUT_KINDS)}")
    request = pb.DetectRequest(model=model or "", version=int(version or 0), heatmap=HEATMAPS[heatmap], id=id,
                               operating_point=str(operating_point), input_kind=INPUT_KINDS.get(input_kind, 0))  # fmt: skip
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"array dtype {image.dtype}: send uint8 RGB pixels")
        request.tensor.shape.extend(image.shape)
        request.tensor.data = np.ascontiguousarray(image).tobytes()
        request.tensor.dtype = "uint8"
    elif isinstance(image, (bytes, bytearray, memoryview)):
        request.image = bytes(image)
    else:
        request.image = Path(image).read_bytes()
    return request


def _result(response: pb.DetectResponse, name: str) -> Detection | DetectionError:
    if response.HasField("error"):
        return DetectionError(name, _CODE_NAMES.get(response.error.code, "UNKNOWN"), response.error.message)
    heatmap = response.heatmap
    cam = None
    if heatmap.kind == pb.HEATMAP_GRID and heatmap.HasField("grid"):
        cam = np.asarray(heatmap.grid.values, dtype=np.float32).reshape(tuple(heatmap.grid.shape))
    t = response.timings
    return Detection(
        image=name,
        score=float(response.score),
        probability=float(response.probability),
        label=response.label,
        threshold=float(response.threshold),
        operating_point=response.operating_point,
        probability_threshold=float(response.probability_threshold),
        model=response.model,
        version=int(response.version),
        cam=cam,
        heatmap_png=heatmap.png or None,
        timings={"decode_ms": t.decode_ms, "queue_ms": t.queue_ms, "compute_ms": t.compute_ms, "total_ms": t.total_ms},
        input_kind="photo" if response.input_kind == pb.INPUT_KIND_PHOTO else "aligned",
        status=IMAGE_STATUS_NAMES.get(response.status, "aligned"),
        faces=[_face(face) for face in response.faces],
        verdict_face=int(response.verdict_face) if response.input_kind == pb.INPUT_KIND_PHOTO else -1,
    )


def _face(face: pb.Face) -> dict[str, Any]:
    data = {
        "box": [round(v, 2) for v in (face.box.left, face.box.top, face.box.right, face.box.bottom)],
        "landmarks": [[round(p.x, 2), round(p.y, 2)] for p in face.landmarks],
        "confidence": round(face.confidence, 4),
        "status": FACE_STATUS_NAMES.get(face.status, "scored"),
        "score": round(face.score, 6),
        "probability": round(face.probability, 6),
        "label": face.label,
    }
    if face.HasField("grid"):
        data["cam"] = np.asarray(face.grid.values, dtype=np.float32).reshape(tuple(face.grid.shape))
    return data


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class DetectorClient:
    """A blocking client for one server; safe to share between threads."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        tls_ca: str | os.PathLike | None = None,
        tls_cert: str | os.PathLike | None = None,
        tls_key: str | os.PathLike | None = None,
        tls: bool | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.25,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ):
        """`tls` defaults to on when a CA or client certificate is given (system roots when only `tls=True`)."""
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = max_message_options(max_message_bytes)
        if tls or (tls is None and (tls_ca or tls_cert)):
            read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
            credentials = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.DetectorStub(self.channel)

    # ---- calls -------------------------------------------------------------------------------
    def detect(
        self, image: ImageInput, *, model: str = "", version: int = 0, heatmap: str = "none", operating_point: str | float = "",
        timeout: float | None = None, input_kind: str = "",
    ) -> Detection:
        """Score one image; raises ClientError (e.g. INVALID_ARGUMENT naming the problem) on failure."""
        request = detect_request(image, model, version, heatmap, operating_point=operating_point, input_kind=input_kind)
        response = self._unary(self.stub.Detect, request, timeout)
        return _result(response, image_name(image, 0))

    def detect_batch(
        self, images: Sequence[ImageInput], *, model: str = "", version: int = 0, heatmap: str = "none", operating_point: str | float = "",
        timeout: float | None = None, input_kind: str = "",
    ) -> list[Detection | DetectionError]:
        """Score many images in one call; one result (or DetectionError) per image, in order."""
        requests = [detect_request(image, model, version, heatmap, operating_point=operating_point, input_kind=input_kind) for image in images]
        request = pb.DetectBatchRequest(requests=requests)
        response = self._unary(self.stub.DetectBatch, request, timeout)
        return [_result(item, image_name(image, i)) for i, (image, item) in enumerate(zip(images, response.responses))]

    def stream(
        self, images: Iterable[ImageInput], *, model: str = "", version: int = 0, heatmap: str = "none", operating_point: str | float = "",
        timeout: float | None = None, input_kind: str = "",
    ) -> Iterator[Detection | DetectionError]:
        """Score images over one bidirectional stream, yielding results in order as they arrive.

        Images are read lazily, so an iterator over a large folder streams in constant memory.
        """
        names: dict[str, str] = {}

        def requests() -> Iterator[pb.DetectRequest]:
            for index, image in enumerate(images):
                names[str(index)] = image_name(image, index)
                yield detect_request(image, model, version, heatmap, id=str(index), operating_point=operating_point, input_kind=input_kind)

        call = self.stub.DetectStream(requests(), timeout=timeout, metadata=self.metadata)
        try:
            for response in call:
                yield _result(response, names.get(response.id, response.id))
        except grpc.RpcError as error:
            raise ClientError(error.code(), error.details()) from error

    def list_models(self, timeout: float | None = None) -> tuple[list[dict[str, Any]], str]:
        """(every served model version as a dict, the default model's name)."""
        response = self._unary(self.stub.ListModels, pb.ListModelsRequest(), timeout)
        return [model_info(m) for m in response.models], response.default_model

    def get_model(self, model: str = "", version: int = 0, timeout: float | None = None) -> dict[str, Any]:
        """One model version's info, with its full contract (model.json) under "contract"."""
        return model_info(self._unary(self.stub.GetModel, pb.GetModelRequest(model=model, version=version), timeout))

    # ---- plumbing ----------------------------------------------------------------------------
    def _unary(self, method, request, timeout: float | None):
        """Call with retries on UNAVAILABLE (exponential backoff); ClientError on failure."""
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or attempt == self.retries:
                    raise ClientError(error.code(), error.details()) from error
                time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DetectorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def model_info(info: pb.ModelInfo) -> dict[str, Any]:
    data = {
        field: getattr(info, field)
        for field in ("name", "version", "architecture", "input_height", "input_width", "cam_height", "cam_width",
                      "threshold", "saliency", "backend", "device")  # fmt: skip
    }
    data["threshold"] = round(float(info.threshold), 6)
    data["operating_points"] = {name: round(float(value), 6) for name, value in sorted(info.operating_points.items())}
    data["default_operating_point"] = info.default_operating_point
    data["calibration"] = info.calibration
    data["precision"] = info.precision or "fp32"  # servers before the field said nothing: fp32
    data["contract"] = json.loads(info.contract_json) if info.contract_json else None
    return data
