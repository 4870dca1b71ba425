from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HeatmapKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEATMAP_NONE: _ClassVar[HeatmapKind]
    HEATMAP_GRID: _ClassVar[HeatmapKind]
    HEATMAP_PNG: _ClassVar[HeatmapKind]
    HEATMAP_OVERLAY: _ClassVar[HeatmapKind]

class InputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_KIND_UNSPECIFIED: _ClassVar[InputKind]
    INPUT_KIND_ALIGNED: _ClassVar[InputKind]
    INPUT_KIND_PHOTO: _ClassVar[InputKind]
    INPUT_KIND_AUTO: _ClassVar[InputKind]

class ImageStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_STATUS_ALIGNED: _ClassVar[ImageStatus]
    IMAGE_STATUS_FACES: _ClassVar[ImageStatus]
    IMAGE_STATUS_NO_FACE: _ClassVar[ImageStatus]
    IMAGE_STATUS_FACES_TOO_SMALL: _ClassVar[ImageStatus]

class FaceStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FACE_SCORED: _ClassVar[FaceStatus]
    FACE_TOO_SMALL: _ClassVar[FaceStatus]
    FACE_OVER_LIMIT: _ClassVar[FaceStatus]
HEATMAP_NONE: HeatmapKind
HEATMAP_GRID: HeatmapKind
HEATMAP_PNG: HeatmapKind
HEATMAP_OVERLAY: HeatmapKind
INPUT_KIND_UNSPECIFIED: InputKind
INPUT_KIND_ALIGNED: InputKind
INPUT_KIND_PHOTO: InputKind
INPUT_KIND_AUTO: InputKind
IMAGE_STATUS_ALIGNED: ImageStatus
IMAGE_STATUS_FACES: ImageStatus
IMAGE_STATUS_NO_FACE: ImageStatus
IMAGE_STATUS_FACES_TOO_SMALL: ImageStatus
FACE_SCORED: FaceStatus
FACE_TOO_SMALL: FaceStatus
FACE_OVER_LIMIT: FaceStatus

class Box(_message.Message):
    __slots__ = ("left", "top", "right", "bottom")
    LEFT_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_FIELD_NUMBER: _ClassVar[int]
    left: float
    top: float
    right: float
    bottom: float
    def __init__(self, left: _Optional[float] = ..., top: _Optional[float] = ..., right: _Optional[float] = ..., bottom: _Optional[float] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...

class Face(_message.Message):
    __slots__ = ("box", "landmarks", "confidence", "status", "score", "probability", "label", "grid")
    BOX_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    box: Box
    landmarks: _containers.RepeatedCompositeFieldContainer[Point]
    confidence: float
    status: FaceStatus
    score: float
    probability: float
    label: str
    grid: Grid
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., landmarks: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., confidence: _Optional[float] = ..., status: _Optional[_Union[FaceStatus, str]] = ..., score: _Optional[float] = ..., probability: _Optional[float] = ..., label: _Optional[str] = ..., grid: _Optional[_Union[Grid, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "data", "dtype")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    dtype: str
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., dtype: _Optional[str] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("image", "tensor", "model", "version", "heatmap", "id", "operating_point", "input_kind")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    OPERATING_POINT_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    tensor: Tensor
    model: str
    version: int
    heatmap: HeatmapKind
    id: str
    operating_point: str
    input_kind: InputKind
    def __init__(self, image: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., heatmap: _Optional[_Union[HeatmapKind, str]] = ..., id: _Optional[str] = ..., operating_point: _Optional[str] = ..., input_kind: _Optional[_Union[InputKind, str]] = ...) -> None: ...

class Grid(_message.Message):
    __slots__ = ("shape", "values")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class Heatmap(_message.Message):
    __slots__ = ("kind", "grid", "png")
    KIND_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    kind: HeatmapKind
    grid: Grid
    png: bytes
    def __init__(self, kind: _Optional[_Union[HeatmapKind, str]] = ..., grid: _Optional[_Union[Grid, _Mapping]] = ..., png: _Optional[bytes] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "compute_ms", "total_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    compute_ms: float
    total_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("id", "score", "label", "threshold", "model", "version", "heatmap", "timings", "error", "probability", "operating_point", "probability_threshold", "faces", "status", "verdict_face", "input_kind")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    OPERATING_POINT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FACE_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    label: str
    threshold: float
    model: str
    version: int
    heatmap: Heatmap
    timings: Timings
    error: Error
    probability: float
    operating_point: str
    probability_threshold: float
    faces: _containers.RepeatedCompositeFieldContainer[Face]
    status: ImageStatus
    verdict_face: int
    input_kind: InputKind
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., label: _Optional[str] = ..., threshold: _Optional[float] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., heatmap: _Optional[_Union[Heatmap, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., probability: _Optional[float] = ..., operating_point: _Optional[str] = ..., probability_threshold: _Optional[float] = ..., faces: _Optional[_Iterable[_Union[Face, _Mapping]]] = ..., status: _Optional[_Union[ImageStatus, str]] = ..., verdict_face: _Optional[int] = ..., input_kind: _Optional[_Union[InputKind, str]] = ...) -> None: ...

class DetectBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[DetectRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[DetectRequest, _Mapping]]] = ...) -> None: ...

class DetectBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[DetectResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[DetectResponse, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model", "default_version")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    default_version: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ..., default_version: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "architecture", "input_height", "input_width", "cam_height", "cam_width", "threshold", "saliency", "backend", "device", "contract_json", "operating_points", "default_operating_point", "calibration", "precision")
    class OperatingPointsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CAM_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CAM_WIDTH_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SALIENCY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_JSON_FIELD_NUMBER: _ClassVar[int]
    OPERATING_POINTS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_OPERATING_POINT_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    architecture: str
    input_height: int
    input_width: int
    cam_height: int
    cam_width: int
    threshold: float
    saliency: str
    backend: str
    device: str
    contract_json: str
    operating_points: _containers.ScalarMap[str, float]
    default_operating_point: str
    calibration: str
    precision: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., architecture: _Optional[str] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., cam_height: _Optional[int] = ..., cam_width: _Optional[int] = ..., threshold: _Optional[float] = ..., saliency: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., contract_json: _Optional[str] = ..., operating_points: _Optional[_Mapping[str, float]] = ..., default_operating_point: _Optional[str] = ..., calibration: _Optional[str] = ..., precision: _Optional[str] = ...) -> None: ...
