"""The `cyborg.v1.Detector` service: wire messages <-> data-plane types, nothing else."""

from __future__ import annotations

import asyncio
import json
import math
import time

import grpc
import numpy as np

from core.contract import DEFAULT_POINT_KEY
from core.thresholds import LEGACY_POINT
from serving.dataplane import DataPlane, DetectRequest, DetectResult
from serving.errors import InvalidArgument, RequestTooLarge, ShuttingDown, quote, status_of
from serving.proto.cyborg.v1 import detector_pb2 as pb
from serving.proto.cyborg.v1 import detector_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Detector"].full_name
HEATMAPS = {
    pb.HEATMAP_NONE: "none",
    pb.HEATMAP_GRID: "grid",
    pb.HEATMAP_PNG: "png",
    pb.HEATMAP_OVERLAY: "overlay",
}
HEATMAP_ENUMS = {name: kind for kind, name in HEATMAPS.items()}
INPUT_KINDS = {
    pb.INPUT_KIND_UNSPECIFIED: "aligned",
    pb.INPUT_KIND_ALIGNED: "aligned",
    pb.INPUT_KIND_PHOTO: "photo",
    pb.INPUT_KIND_AUTO: "auto",
}
IMAGE_STATUSES = {"aligned": pb.IMAGE_STATUS_ALIGNED, "faces": pb.IMAGE_STATUS_FACES, "no_face": pb.IMAGE_STATUS_NO_FACE, "faces_too_small": pb.IMAGE_STATUS_FACES_TOO_SMALL}
FACE_STATUSES = {"scored": pb.FACE_SCORED, "too_small": pb.FACE_TOO_SMALL, "over_limit": pb.FACE_OVER_LIMIT}
STREAM_WINDOW = 256  # items of one stream or batch call in flight at once (back-pressure beyond that)


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def tensor_array(tensor: pb.Tensor) -> np.ndarray:
    """A wire Tensor as a uint8 array, checking dtype, shape and byte count."""
    if tensor.dtype not in ("", "uint8"):
        raise InvalidArgument(f"tensor dtype {quote(tensor.dtype)}: expected uint8")
    shape = list(tensor.shape)
    if len(shape) != 3 or any(side < 0 for side in shape):
        raise InvalidArgument(f"tensor shape {quote(shape)}: expected [3, H, W] or [H, W, 3]")
    needed = math.prod(shape)  # Python ints: no overflow, whatever the sides
    if needed != len(tensor.data):
        raise InvalidArgument(f"tensor shape {shape} needs {needed} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, np.uint8).reshape(shape)


def to_request(message: pb.DetectRequest, deadline: float | None) -> DetectRequest:
    kind = message.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("request has neither an image nor a tensor")
    if message.heatmap not in HEATMAPS:
        raise InvalidArgument(f"heatmap kind {message.heatmap} is not one of {sorted(HEATMAPS)}")
    if message.version < 0:
        raise InvalidArgument(f"version {message.version}: 0 (latest) or a positive number")
    if message.input_kind not in INPUT_KINDS:
        raise InvalidArgument(f"input kind {message.input_kind} is not one of {sorted(INPUT_KINDS)}")
    return DetectRequest(
        image=message.image if kind == "image" else None,
        tensor=tensor_array(message.tensor) if kind == "tensor" else None,
        model=message.model,
        version=message.version,
        heatmap=HEATMAPS[message.heatmap],
        deadline=deadline,
        operating_point=message.operating_point,
        input_kind=INPUT_KINDS[message.input_kind],
    )


def to_response(result: DetectResult, request_id: str, heatmap: str) -> pb.DetectResponse:
    response = pb.DetectResponse(
        id=request_id,
        score=result.score,
        probability=result.probability,
        label=result.label,
        threshold=result.threshold,
        operating_point=result.operating_point,
        probability_threshold=result.probability_threshold,
        model=result.model,
        version=result.version,
        timings=pb.Timings(**result.timings),
        status=IMAGE_STATUSES[result.status],
        verdict_face=result.verdict_face,
        input_kind=pb.INPUT_KIND_PHOTO if result.input_kind == "photo" else pb.INPUT_KIND_ALIGNED,
    )
    for face in result.faces:
        message = response.faces.add(
            box=pb.Box(left=face.box[0], top=face.box[1], right=face.box[2], bottom=face.box[3]),
            landmarks=[pb.Point(x=float(x), y=float(y)) for x, y in face.landmarks],
            confidence=face.confidence,
            status=FACE_STATUSES[face.status],
            score=face.score,
            probability=face.probability,
            label=face.label,
        )
        if heatmap == "grid" and face.cam is not None:
            message.grid.shape.extend(face.cam.shape)
            message.grid.values.extend(face.cam.ravel().tolist())
    if heatmap != "none":
        response.heatmap.kind = HEATMAP_ENUMS[heatmap]
        if heatmap == "grid":
            response.heatmap.grid.shape.extend(result.cam.shape)
            response.heatmap.grid.values.extend(result.cam.ravel().tolist())
        elif result.heatmap_png is not None:  # a photo without a scored face has no picture
            response.heatmap.png = result.heatmap_png
    return response


def error_response(error: Exception, request_id: str) -> pb.DetectResponse:
    code, message = status_of(error)
    return pb.DetectResponse(id=request_id, error=pb.Error(code=code.value[0], message=message))


class DetectorServicer(pb_grpc.DetectorServicer):
    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane

    async def Detect(self, request, context):
        result = await self.dataplane.detect(to_request(request, deadline_of(context)))
        return to_response(result, request.id, HEATMAPS[request.heatmap])

    async def _item(self, message: pb.DetectRequest, deadline: float | None) -> pb.DetectResponse:
        """One batch or stream item; its failure becomes an error response, not a failed call."""
        try:
            result = await self.dataplane.detect(to_request(message, deadline))
        except Exception as error:  # noqa: BLE001 - reported per item
            return error_response(error, message.id)
        return to_response(result, message.id, HEATMAPS[message.heatmap])

    async def DetectBatch(self, request, context):
        limit = self.dataplane.limits.max_batch_items
        if len(request.requests) > limit:
            raise RequestTooLarge(f"{len(request.requests)} items in one DetectBatch: the limit is {limit} (--max-batch-items); split the batch or use DetectStream")
        deadline = deadline_of(context)
        window = asyncio.Semaphore(STREAM_WINDOW)  # a huge batch must not flood the model's queue

        async def item(message: pb.DetectRequest) -> pb.DetectResponse:
            async with window:
                return await self._item(message, deadline)

        responses = await asyncio.gather(*(item(message) for message in request.requests))
        return pb.DetectBatchResponse(responses=responses)

    async def DetectStream(self, request_iterator, context):
        deadline = deadline_of(context)
        async for response in ordered_stream(request_iterator, lambda message: self._item(message, deadline), self.dataplane.closing):
            yield response

    async def ListModels(self, request, context):
        repository = self.dataplane.repository
        return pb.ListModelsResponse(
            models=[model_info(model) for model in repository.loaded()],
            default_model=repository.default_name,
            default_version=repository.default_version(),
        )

    async def GetModel(self, request, context):
        if request.version < 0:
            raise InvalidArgument(f"version {request.version}: 0 (latest) or a positive number")
        return model_info(self.dataplane.repository.get(request.model, request.version))


async def ordered_stream(requests, answer, closing: asyncio.Event, window: int = STREAM_WINDOW):
    """Answer each request of a stream with `await answer(request)`, up to `window` at once, yielding
    the answers in request order.

    When the call ends early (the client cancels, the deadline passes) every item still queued or
    running is cancelled: it leaves the batch queue and is not counted as answered. When `closing`
    is set (server shutdown), reading stops, the items already read are answered, and the stream
    ends with UNAVAILABLE so the client reconnects elsewhere instead of holding the shutdown.
    """
    pending: asyncio.Queue = asyncio.Queue(window)
    stopped = asyncio.ensure_future(closing.wait())

    async def read() -> None:
        try:
            iterator = aiter(requests)
            while True:
                receive = asyncio.ensure_future(anext(iterator))
                await asyncio.wait((receive, stopped), return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    receive.cancel()
                    return
                try:
                    message = receive.result()
                except StopAsyncIteration:
                    return
                await pending.put(asyncio.ensure_future(answer(message)))
        finally:
            await pending.put(None)

    reader = asyncio.ensure_future(read())
    try:
        while (task := await pending.get()) is not None:
            yield await task
        await reader  # re-raise a broken request stream
        if closing.is_set():
            raise ShuttingDown("server is shutting down: stream ended, reconnect to go on")
    finally:
        reader.cancel()
        stopped.cancel()
        while not pending.empty():
            task = pending.get_nowait()
            if task is not None:
                task.cancel()


def model_info(model) -> pb.ModelInfo:
    """A loaded model's contract (and engine) as a ModelInfo message."""
    contract = model.contract
    points = dict(contract.operating_points or {})
    default = points.pop(DEFAULT_POINT_KEY, LEGACY_POINT)
    return pb.ModelInfo(
        name=contract.name,
        version=contract.version,
        architecture=contract.architecture,
        input_height=contract.input_height,
        input_width=contract.input_width,
        cam_height=contract.cam_height,
        cam_width=contract.cam_width,
        threshold=contract.threshold,
        saliency=contract.training.get("saliency", "none"),
        backend=model.backend.name,
        device=model.backend.device,
        contract_json=json.dumps(contract.to_dict(), sort_keys=True),
        operating_points=points or {LEGACY_POINT: contract.threshold},
        default_operating_point=default,
        calibration=(contract.calibration or {}).get("method", "none"),
        precision=contract.precision,
    )


def add_to_server(server: grpc.aio.Server, dataplane: DataPlane) -> str:
    """Register the Detector service; returns its full name (for health and reflection)."""
    pb_grpc.add_DetectorServicer_to_server(DetectorServicer(dataplane), server)
    return SERVICE
