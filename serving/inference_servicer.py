"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`) over the data plane.

Wire messages in, `DataPlane` calls, wire messages out: nothing else. Tensor names and the model's
input size come from the model contract; errors are raised as `serving.errors` types and turned
into status codes by the server's error interceptor, like every other protocol.

The message classes are built in a private descriptor pool from the descriptor that protoc wrote
into `serving/proto/inference/grpc_service_pb2.py`, which is read, not imported: tritonclient
registers the same `inference.*` names in protobuf's default pool, and a process that holds both
(a test, an application that embeds the server and calls it with tritonclient) would fail at
import with "duplicate symbol". The wire format is identical either way.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import grpc
import numpy as np

from core import __version__
from core import contract as c
from serving.errors import InvalidArgument, quote, status_of
from serving.servicer import ordered_stream  # the Detector's stream discipline, shared

if TYPE_CHECKING:
    from serving.dataplane import DataPlane

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "cyborg"
GENERATED = Path(__file__).parent / "proto" / "inference" / "grpc_service_pb2.py"
MESSAGES = (
    "ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse",
    "ModelReadyRequest", "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse",
    "ModelMetadataRequest", "ModelMetadataResponse", "ModelInferRequest", "ModelInferResponse",
    "ModelStreamInferResponse", "RepositoryIndexRequest", "RepositoryIndexResponse",
    "RepositoryModelLoadRequest", "RepositoryModelLoadResponse", "RepositoryModelUnloadRequest",
    "RepositoryModelUnloadResponse",
)  # fmt: skip
MAX_VERSION_DIGITS = 18  # a version string longer than this is refused before int() (fits int64)

# KServe v2 datatype names <-> numpy dtypes (little-endian on the wire).
DATATYPES = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}  # fmt: skip
INPUT_DATATYPE = "UINT8"
OUTPUT_DATATYPE = "FP32"


def serialized_descriptor(path: Path = GENERATED) -> bytes:
    """The FileDescriptorProto bytes protoc embedded in a generated `_pb2.py` (found, not executed)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return ast.literal_eval(node.args[0])
    raise RuntimeError(f"{path}: no serialized descriptor; run `python -m serving.proto.generate`")


@functools.cache
def messages() -> SimpleNamespace:
    """The protocol's message classes, from a private descriptor pool (see the module docstring)."""
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(serialized_descriptor())
    package = pool.FindServiceByName(SERVICE).file.package
    return SimpleNamespace(
        **{name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}")) for name in MESSAGES}
    )


def parse_version(text: str) -> int:
    """A wire version string ("" = latest) as the data plane's int (0 = latest)."""
    if not text:
        return 0
    if len(text) > MAX_VERSION_DIGITS or not text.isascii() or not text.isdigit() or int(text) < 1:
        raise InvalidArgument(f"model version {quote(text)}: expected a positive integer (ASCII digits, at most {MAX_VERSION_DIGITS}) or empty for the latest")
    return int(text)


def output_shapes(contract: c.ModelContract) -> dict[str, list[int]]:
    """Output shapes with -1 for the batch dimension."""
    return {name: list(shape) for name, shape in contract.output_shapes(-1).items()}


@dataclasses.dataclass
class InferRequest:
    """A received ModelInferRequest: the message without its raw_input_contents, and those as views of
    the received bytes. Parsed by protobuf, a 30 MB tensor batch would be copied into the message and
    again at each read of the field: 60 MB more for each large request in flight."""

    message: object  # ModelInferRequest
    raw: list[memoryview]


def infer_request_parser(message_class):
    """The request deserializer of ModelInfer and ModelStreamInfer: bytes -> InferRequest."""
    number = message_class.DESCRIPTOR.fields_by_name["raw_input_contents"].number

    def parse(data: bytes) -> InferRequest:
        try:
            rest, raw = split_field(data, number)
        except ValueError:  # not well-formed at the top level: protobuf parses (and judges) it all
            message = message_class.FromString(data)
            return InferRequest(message, [memoryview(value) for value in message.raw_input_contents])
        return InferRequest(message_class.FromString(rest), raw)

    return parse


def split_field(data: bytes, number: int) -> tuple[bytes, list[memoryview]]:
    """(the encoded message without its top-level length-delimited field `number`, that field's values
    as views of `data`, in order); ValueError where the wire format breaks."""
    view = memoryview(data)
    rest, values = bytearray(), []
    position, end = 0, len(data)
    while position < end:
        start = position
        tag, position = read_varint(data, position)
        kind = tag & 7
        if kind == 0:
            _, position = read_varint(data, position)
        elif kind == 1:
            position += 8
        elif kind == 2:
            length, position = read_varint(data, position)
            if tag >> 3 == number:
                if position + length > end:
                    raise ValueError("truncated field")
                values.append(view[position : position + length])
                position += length
                continue
            position += length
        elif kind == 5:
            position += 4
        else:
            raise ValueError(f"wire type {kind}")
        if position > end:
            raise ValueError("truncated field")
        rest += view[start:position]
    return bytes(rest), values


def read_varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while position < len(data) and shift < 64:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
    raise ValueError("bad varint")


def input_images(request, contract: c.ModelContract, raw: list | None = None) -> np.ndarray:
    """The request's single `images` input as uint8 [B,3,H,W]; InvalidArgument naming any problem.
    `raw` is the request's raw_input_contents when they were taken out of the message (InferRequest)."""
    raw_contents = list(request.raw_input_contents) if raw is None else raw
    names = [tensor.name for tensor in request.inputs]
    if names != [contract.input_name]:
        raise InvalidArgument(f"inputs {names}: model {contract.name!r} takes exactly one input {contract.input_name!r}")
    tensor = request.inputs[0]
    where = f"input {tensor.name!r}"
    if tensor.datatype != INPUT_DATATYPE:
        raise InvalidArgument(f"{where}: datatype {tensor.datatype or '(none)'}, expected {INPUT_DATATYPE}")
    shape = list(tensor.shape)
    expected = [-1, *contract.input_shape]
    if len(shape) != 4 or shape[0] < 1 or shape[1:] != expected[1:]:
        raise InvalidArgument(f"{where}: shape {shape}, expected {expected} (uint8 NCHW at the model's input size)")
    count = math.prod(shape)
    if raw_contents:
        if len(raw_contents) != len(request.inputs):
            raise InvalidArgument(f"{len(raw_contents)} raw_input_contents for {len(request.inputs)} inputs")
        if tensor.HasField("contents"):
            raise InvalidArgument(f"{where}: both contents and raw_input_contents given")
        raw = raw_contents[0]
        if len(raw) != count:
            raise InvalidArgument(f"{where}: {len(raw)} bytes of raw content, shape {shape} of UINT8 needs {count}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    values = tensor.contents.uint_contents
    if len(values) != count:
        raise InvalidArgument(f"{where}: {len(values)} values in contents.uint_contents, shape {shape} needs {count}")
    array = np.asarray(values, dtype=np.uint32)
    if array.size and int(array.max()) > 255:
        raise InvalidArgument(f"{where}: value {int(array.max())} in contents does not fit UINT8")
    return array.astype(np.uint8).reshape(shape)


def check_repository(name: str) -> None:
    if name:
        raise InvalidArgument(f"repository {quote(name)}: this server has one repository (leave the name empty)")


def requested_outputs(request, contract: c.ModelContract) -> list[str]:
    names = [output.name for output in request.outputs] or list(contract.output_names)
    unknown = [name for name in names if name not in contract.output_names]
    if unknown:
        raise InvalidArgument(f"outputs {unknown}: model {contract.name!r} has {list(contract.output_names)}")
    return names


class InferenceServicer:
    """`inference.GRPCInferenceService` methods as grpc.aio behaviours over a `DataPlane`."""

    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane
        self.m = messages()

    async def ServerLive(self, request, context):
        return self.m.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request, context):
        return self.m.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request, context):
        version = parse_version(request.version)
        return self.m.ModelReadyResponse(ready=bool(request.name) and self.dataplane.model_ready(request.name, version))

    async def ServerMetadata(self, request, context):
        return self.m.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    async def ModelMetadata(self, request, context):
        contract = self.dataplane.contract(request.name, parse_version(request.version))
        versions = sorted({m.version for m in self.dataplane.models() if m.name == contract.name})
        response = self.m.ModelMetadataResponse(name=contract.name, versions=[str(v) for v in versions], platform=c.TRITON_PLATFORM)
        response.inputs.add(name=contract.input_name, datatype=INPUT_DATATYPE, shape=[-1, *contract.input_shape])
        for name, shape in output_shapes(contract).items():
            response.outputs.add(name=name, datatype=OUTPUT_DATATYPE, shape=shape)
        return response

    async def RepositoryIndex(self, request, context):
        check_repository(request.repository_name)
        response = self.m.RepositoryIndexResponse()
        for status in self.dataplane.repository.statuses():
            if request.ready and status.state != "READY":
                continue
            state = "LOADING" if status.state == "INCOMPLETE" else status.state
            response.models.add(name=status.name, version=str(status.version), state=state, reason=status.error)
        return response

    async def RepositoryModelLoad(self, request, context):
        check_repository(request.repository_name)
        overrides = sorted(key for key in request.parameters if key == "config" or key.startswith("file:"))
        if overrides:
            raise InvalidArgument(f"parameters {quote(overrides)}: cyborg loads only what the repository holds (no config or file overrides)")
        await self.dataplane.load_model(request.model_name)
        return self.m.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        check_repository(request.repository_name)  # parameters (unload_dependents): no ensembles here
        await self.dataplane.unload_model(request.model_name)
        return self.m.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request, context):
        remaining = context.time_remaining()
        return await self.infer(request, None if remaining is None else time.monotonic() + remaining)

    async def ModelStreamInfer(self, request_iterator, context):
        """ModelInfer for each request of the stream, answered in order; a failure is the item's
        `error_message` (its status message), and the stream goes on."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining

        async def answer(request: InferRequest):
            try:
                return self.m.ModelStreamInferResponse(infer_response=await self.infer(request, deadline))
            except Exception as error:  # noqa: BLE001 - reported per item
                code, message = status_of(error)
                return self.m.ModelStreamInferResponse(error_message=f"{code.name}: {message}", infer_response=self.m.ModelInferResponse(id=request.message.id))

        async for response in ordered_stream(request_iterator, answer, self.dataplane.closing):
            yield response

    async def infer(self, received: InferRequest, deadline: float | None):
        request = received.message
        version = parse_version(request.model_version)
        contract = self.dataplane.contract(request.model_name, version)
        images = input_images(request, contract, received.raw)
        names = requested_outputs(request, contract)
        outputs = await self.dataplane.infer(contract.name, version, images, deadline)
        response = self.m.ModelInferResponse(model_name=contract.name, model_version=str(contract.version), id=request.id)
        for name in names:
            array = np.ascontiguousarray(outputs[name], dtype=DATATYPES[OUTPUT_DATATYPE])
            response.outputs.add(name=name, datatype=OUTPUT_DATATYPE, shape=list(array.shape))
            response.raw_output_contents.append(array.tobytes())
        return response


def handler(dataplane: DataPlane) -> grpc.GenericRpcHandler:
    """A generic handler serving every method of `SERVICE` (what `add_to_server` registers)."""
    servicer = InferenceServicer(dataplane)
    m = servicer.m
    methods = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=getattr(m, f"{name}Request").FromString,
            response_serializer=getattr(m, f"{name}Response").SerializeToString,
        )
        for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
    }
    methods["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=infer_request_parser(m.ModelInferRequest),
        response_serializer=m.ModelInferResponse.SerializeToString,
    )
    methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=infer_request_parser(m.ModelInferRequest),
        response_serializer=m.ModelStreamInferResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def add_to_server(server: grpc.aio.Server, dataplane: DataPlane) -> str:
    """Register the protocol on `server`; returns the full service name (for health and reflection)."""
    server.add_generic_rpc_handlers((handler(dataplane),))
    return SERVICE
