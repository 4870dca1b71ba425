"""The data plane: detection and raw inference on internal types, no wire protocol.

Servicers (Detector, Open Inference Protocol) convert wire messages to `DetectRequest` or raw
arrays, call a `DataPlane`, and convert the results back; nothing here knows about protobuf.
Decoding, resizing and heatmap rendering run on a worker pool (images over
`Limits.low_priority_pixels` on a pool of low-priority threads, serving.workers); inference goes
through the model's dynamic batcher; every outcome is counted in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import threading
import time
from concurrent.futures import Executor

import numpy as np
from PIL import Image

from core import heatmaps
from core.contract import CAM_OUTPUT, SCORE_OUTPUT, ModelContract, label_for
from core.errors import UserError
from core.thresholds import Calibration, resolve_operating_point
from serving.errors import InvalidArgument, ModelNotFound, ModelNotReady, ServerBusy, Unimplemented, reason_of  # noqa: F401 (ModelNotFound: part of this API)
from core.contract import LEGACY_SCALE
from core.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, MIN_SIDE, RESAMPLING, decode_image, input_region, prepare
from serving.faces import DEFAULT_MAX_FACES, DEFAULT_MIN_FACE, INPUT_KINDS, SCORED, Detectors, FaceResult, find_faces, place_cams, upright_size
from serving.metrics import Metrics
from serving.repository import ModelRepository

HEATMAP_KINDS = ("none", "grid", "png", "overlay")


@dataclasses.dataclass
class DetectRequest:
    """One image to score: encoded bytes or a uint8 tensor ([3,H,W] or [H,W,3], any H and W)."""

    image: bytes | None = None
    tensor: np.ndarray | None = None
    model: str = ""  # "" -> the default model
    version: int = 0  # 0 -> the latest loaded version
    heatmap: str = "none"  # none | grid | png | overlay
    deadline: float | None = None  # time.monotonic() deadline
    operating_point: str = ""  # "" -> the model's default; a name the model records, or a number in [0, 1]
    input_kind: str = "aligned"  # aligned | photo | auto (serving/faces.py; docs/serving.md, "Photos")


@dataclasses.dataclass
class DetectResult:
    model: str
    version: int
    score: float  # the model's raw fake score
    label: str  # "fake" when probability >= probability_threshold
    threshold: float  # the operating point's threshold carried back to the raw score
    cam: np.ndarray  # float32 [h, w] in [0, 1], the model's CAM (returned for every heatmap kind)
    heatmap_png: bytes | None = None  # png / overlay: PNG at the image's size (within Limits.max_heatmap_side)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # decode_ms, queue_ms, compute_ms, total_ms
    probability: float = 0.0  # the calibrated fake probability (the score itself for an uncalibrated model)
    operating_point: str = ""  # the operating point used
    probability_threshold: float = 0.0  # its threshold on the probability
    input_kind: str = "aligned"  # how the picture was scored: aligned (whole) or photo (per face)
    status: str = "aligned"  # aligned | faces | no_face | faces_too_small
    faces: list[FaceResult] = dataclasses.field(default_factory=list)  # photo: every face found, largest first
    verdict_face: int = -1  # photo: the index in faces of the most suspicious scored face (-1: none)


DECODE_HEADROOM_PIXELS = 16_000_000  # the default decode budget's room for ordinary images beside one at the limit
LOW_PRIORITY_PIXELS = 16_000_000  # images over this are decoded and drawn at low CPU priority
REDUCE_MARGIN = 2  # images are decoded at no less than this many times the side the model needs


@dataclasses.dataclass(frozen=True)
class Limits:
    """The per-request and server-wide bounds (each a `cyborg serve` flag; docs/serving.md, "Limits")."""

    max_image_bytes: int = DEFAULT_MAX_BYTES
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_decode_pixels: int = 0  # pixels being decoded at once, server-wide; 0: max_image_pixels + DECODE_HEADROOM_PIXELS
    max_heatmap_side: int = heatmaps.DEFAULT_MAX_SIDE  # longest side of PNG heatmaps and overlays
    max_batch_items: int = 1024  # items in one DetectBatch call
    max_faces: int = DEFAULT_MAX_FACES  # faces scored in one photo (largest first; the rest: over_limit)
    min_face: int = DEFAULT_MIN_FACE  # smallest face scored: its FFHQ square's side in original pixels
    low_priority_pixels: int = LOW_PRIORITY_PIXELS  # larger images: decoded and drawn on the low-priority pool; 0: never

    @property
    def decode_pixels(self) -> int:
        return self.max_decode_pixels or self.max_image_pixels + DECODE_HEADROOM_PIXELS


class PixelBudget:
    """A server-wide bound on pixels being decoded at once (thread-safe: decoding runs on a pool).

    `hold(pixels)` admits an image when the pixels already held plus its own stay within `limit`, or
    when nothing else is held (so one image at the pixel limit always gets its turn); otherwise it
    raises ServerBusy (RESOURCE_EXHAUSTED) at once rather than queueing the memory.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        with self._lock:
            if self.held and self.held + pixels > self.limit:
                raise ServerBusy(
                    f"server busy: {self.held} pixels are being decoded and this image's {pixels} would pass the "
                    f"{self.limit}-pixel limit (--max-decode-pixels); retry shortly"
                )
            self.held += pixels
        try:
            yield
        finally:
            with self._lock:
                self.held -= pixels


class DataPlane:
    """Protocol-free serving API over a model repository."""

    def __init__(
        self,
        repository: ModelRepository,
        pool: Executor,
        metrics: Metrics,
        limits: Limits = Limits(),
        low_priority_pool: Executor | None = None,
        model_load_api: bool = False,
    ):
        self.repository = repository
        self.model_load_api = model_load_api  # load_model / unload_model allowed (`--model-load-api`)
        self.pool = pool
        self.low_priority_pool = low_priority_pool  # for images over limits.low_priority_pixels (None: `pool`)
        self.metrics = metrics
        self.limits = limits
        self.decoding = PixelBudget(limits.decode_pixels)
        self.detectors = Detectors()  # the face detector, loaded by the first photo
        self._live = True
        self.closing = asyncio.Event()  # set at the start of shutdown: streams finish what they hold and end

    # ---- health and metadata -------------------------------------------------------------
    def live(self) -> bool:
        return self._live

    def ready(self) -> bool:
        return self._live and self.repository.ready()

    def model_ready(self, name: str, version: int = 0) -> bool:
        try:
            self.repository.get(name, version)
        except Exception:  # noqa: BLE001 - not found or not ready both mean "no"
            return False
        return True

    def contract(self, name: str = "", version: int = 0) -> ModelContract:
        """The contract of a loaded model version; raises ModelNotFound."""
        return self.repository.get(name, version).contract

    def models(self) -> list[ModelContract]:
        return [model.contract for model in self.repository.loaded()]

    async def reload(self):
        """Rescan the repository now; returns the repository's ReloadReport."""
        return await self.repository.reload()

    async def load_model(self, name: str):
        """Load (or reload) one model and serve it again after an unload (`--model-load-api` only)."""
        self._check_load_api("load")
        return await self.repository.load_model(name)

    async def unload_model(self, name: str):
        """Stop serving one model until it is loaded again (`--model-load-api` only)."""
        self._check_load_api("unload")
        return await self.repository.unload_model(name)

    def _check_load_api(self, action: str) -> None:
        if not self.model_load_api:
            raise Unimplemented(f"model {action} is off on this server (start it with --model-load-api)")

    def shutdown(self) -> None:
        """Stop reporting live (graceful shutdown has begun) and tell open streams to end."""
        self._live = False
        self.closing.set()

    # ---- inference -----------------------------------------------------------------------
    async def detect(self, request: DetectRequest) -> DetectResult:
        started = time.perf_counter()
        model = self._lookup(request.model, request.version)
        labels = (model.contract.name, str(model.contract.version))
        try:
            if request.heatmap not in HEATMAP_KINDS:
                raise InvalidArgument(f"heatmap {request.heatmap!r}: one of {', '.join(HEATMAP_KINDS)}")
            if request.input_kind not in INPUT_KINDS:
                raise InvalidArgument(f"input kind {request.input_kind!r}: one of {', '.join(INPUT_KINDS)}")
            try:
                point = resolve_operating_point(request.operating_point, model.contract)
            except UserError as error:
                raise InvalidArgument(str(error)) from None
            with model.use():
                loop = asyncio.get_running_loop()
                contract = model.contract
                pool = self.pool_for(request)
                if request.input_kind != "aligned":
                    if pool is self.pool:
                        photo = await loop.run_in_executor(pool, self._prepare_photo, request, contract)
                    else:  # decoded at low priority; the face search (on the decoded, bounded image, under
                        # the detector's lock, which ordinary photos wait for) at normal priority
                        image, original = await loop.run_in_executor(pool, self._decode_photo, request, contract)
                        photo = await loop.run_in_executor(self.pool, self._find_photo_faces, request, contract, image, original)
                    if not isinstance(photo, tuple):  # faces to score one by one
                        result = await self._detect_faces(request, model, point, photo, started, pool)
                        self.metrics.request_succeeded(*labels, time.perf_counter() - started)
                        return result
                    picture, region, images = photo  # auto: one face filling the frame
                elif needs_pool(request, contract):
                    picture, region, images = await loop.run_in_executor(pool, self._prepare, request, contract)
                else:  # a tensor already at the model's size: no decoding, no resizing
                    picture, region, images = self._prepare(request, contract)
                decoded = time.perf_counter()
                result = await model.batcher.submit(images, request.deadline)
                score = float(result.outputs[SCORE_OUTPUT][0])
                cam = np.asarray(result.outputs[CAM_OUTPUT][0], dtype=np.float32)
                png = None
                if request.heatmap in ("png", "overlay"):
                    png = await loop.run_in_executor(pool, heatmaps.render, request.heatmap, cam, picture, region)
        except BaseException as error:
            self.metrics.request_failed(*labels, reason_of(error) if isinstance(error, Exception) else "cancelled")
            raise
        total = time.perf_counter() - started
        self.metrics.request_succeeded(*labels, total)
        calibration = Calibration.of(contract)
        probability = calibration.apply(score)
        return DetectResult(
            model=contract.name,
            version=contract.version,
            score=score,
            probability=probability,
            label=label_for(probability, point.threshold),
            threshold=calibration.invert(point.threshold),
            operating_point=point.name,
            probability_threshold=point.threshold,
            cam=cam,
            heatmap_png=png,
            timings={
                "decode_ms": (decoded - started) * 1e3,
                "queue_ms": result.queue_ms,
                "compute_ms": result.compute_ms,
                "total_ms": total * 1e3,
            },
        )

    async def _detect_faces(self, request: DetectRequest, model, point, photo: Photo, started: float, pool: Executor) -> DetectResult:
        """Score the faces `_prepare_photo` found: their rows go through the batcher (in pieces of at
        most max_batch_size, so they join batches with other requests' rows), then the verdict is the
        most suspicious face."""
        found, scale, contract = photo.found, photo.scale, model.contract
        decoded = time.perf_counter()
        calibration = Calibration.of(contract)
        queue_ms = compute_ms = 0.0
        if len(found.inputs):
            step = max(1, model.batcher.max_batch_size)
            pieces = await asyncio.gather(*(model.batcher.submit(found.inputs[i : i + step], request.deadline) for i in range(0, len(found.inputs), step)))
            scores = np.concatenate([piece.outputs[SCORE_OUTPUT] for piece in pieces])
            cams = np.concatenate([piece.outputs[CAM_OUTPUT] for piece in pieces]).astype(np.float32)
            queue_ms, compute_ms = max(p.queue_ms for p in pieces), max(p.compute_ms for p in pieces)
            for index, score, cam in zip(found.scored, scores, cams):
                face = found.faces[index]
                face.score, face.probability, face.cam = float(score), calibration.apply(float(score)), cam
                face.label = label_for(face.probability, point.threshold)
        scored = [found.faces[i] for i in found.scored]
        verdict = max(found.scored, key=lambda i: found.faces[i].probability) if scored else -1
        best = found.faces[verdict] if scored else None
        png = None
        if best is not None and request.heatmap in ("png", "overlay"):
            png = await asyncio.get_running_loop().run_in_executor(
                pool, place_cams, request.heatmap, [f.cam for f in scored], found.decoded, photo.picture, scale, contract
            )
        status = "faces" if scored else "faces_too_small" if found.faces else "no_face"
        return DetectResult(
            model=contract.name,
            version=contract.version,
            score=best.score if best else 0.0,
            probability=best.probability if best else 0.0,
            label=best.label if best else "no_face",
            threshold=calibration.invert(point.threshold),
            operating_point=point.name,
            probability_threshold=point.threshold,
            cam=best.cam if best else np.zeros(contract.cam_shape, np.float32),
            heatmap_png=png,
            timings={"decode_ms": (decoded - started) * 1e3, "queue_ms": queue_ms, "compute_ms": compute_ms, "total_ms": (time.perf_counter() - started) * 1e3},
            input_kind="photo",
            status=status,
            faces=found.faces,
            verdict_face=verdict,
        )

    async def detect_many(self, requests: list[DetectRequest]) -> list[DetectResult | Exception]:
        """Detect each request independently: one bad item does not fail the others."""
        results = await asyncio.gather(*(self.detect(r) for r in requests), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result  # cancellation and the like are not per-item errors
        return list(results)

    async def infer(self, name: str, version: int, images: np.ndarray, deadline: float | None = None) -> dict[str, np.ndarray]:
        """Raw inference: uint8 [B,3,H,W] at the model's input size -> {"score", "logits", "cam"}."""
        started = time.perf_counter()
        model = self._lookup(name, version)
        labels = (model.contract.name, str(model.contract.version))
        try:
            expected = model.contract.input_shape
            if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
                raise InvalidArgument(f"input dtype {getattr(images, 'dtype', type(images).__name__)}: expected uint8")
            if images.ndim != 4 or tuple(images.shape[1:]) != expected or images.shape[0] < 1:
                raise InvalidArgument(f"input shape {list(images.shape)}: expected [B, {', '.join(map(str, expected))}]")
            with model.use():
                outputs = await run_in_chunks(model.batcher, np.ascontiguousarray(images), deadline)
        except BaseException as error:
            self.metrics.request_failed(*labels, reason_of(error) if isinstance(error, Exception) else "cancelled")
            raise
        self.metrics.request_succeeded(*labels, time.perf_counter() - started)
        return outputs

    def pool_for(self, request: DetectRequest) -> Executor:
        """The worker pool for a request's decoding and drawing: the low-priority one for an image
        over `low_priority_pixels` (by its header, or a tensor's sides), so that a few huge images
        do not take the CPU from ordinary requests."""
        limit = self.limits.low_priority_pixels
        if self.low_priority_pool is None or limit <= 0:
            return self.pool
        if request.image is not None:
            pixels = header_pixels(request.image)
        elif request.tensor is not None and request.tensor.ndim == 3:
            pixels = request.tensor.size // 3
        else:
            pixels = 0
        return self.low_priority_pool if pixels > limit else self.pool

    def _lookup(self, name: str, version: int):
        """The loaded model for a request; a failed lookup is counted under empty model labels
        (never the requested name, which a client could vary without bound)."""
        try:
            return self.repository.get(name, version)
        except Exception as error:
            self.metrics.request_failed("", "", reason_of(error))
            raise

    # ---- worker-pool steps ---------------------------------------------------------------
    def _decode(self, data: bytes, contract: ModelContract) -> Image.Image:
        """Decode within the server's limits, at a reduced scale where the picture is far larger than needed."""
        return decode_image(
            data,
            name="image",
            max_bytes=self.limits.max_image_bytes,
            max_pixels=self.limits.max_image_pixels,
            reduce_to=max(REDUCE_MARGIN * needed_side(contract), self.limits.max_heatmap_side),
        )

    def _prepare(self, request: DetectRequest, contract: ModelContract):
        """(picture uint8 [h,w,3] for the heatmap or None, the region of it the model saw, model
        input uint8 [1,3,H,W]) for one request. The picture is the image scaled down to
        `max_heatmap_side`, and only kept when a PNG heatmap or overlay is asked for."""
        if (request.image is None) == (request.tensor is None):
            raise InvalidArgument("a request needs exactly one of an encoded image or a tensor")
        if request.image is not None:
            with self.decoding.hold(min(header_pixels(request.image), self.limits.max_image_pixels)):
                image = self._decode(request.image, contract)
                images = prepare(image, contract)[None]
                picture, region = self._picture(image, request, contract)
            return picture, region, images
        hwc = tensor_to_hwc(request.tensor, self.limits.max_image_pixels)
        image = None if hwc.shape[:2] == (contract.input_height, contract.input_width) else Image.fromarray(hwc)
        images = np.ascontiguousarray(hwc.transpose(2, 0, 1))[None] if image is None else prepare(image, contract)[None]
        if request.heatmap in ("png", "overlay") and image is None:
            image = Image.fromarray(hwc)
        picture, region = self._picture(image, request, contract)
        return picture, region, images

    def _prepare_photo(self, request: DetectRequest, contract: ModelContract):
        """Decode a photo and find its faces: the aligned-path triple of `_prepare` when `auto` finds
        one face filling the frame, else a `Photo` with the faces to score."""
        return self._find_photo_faces(request, contract, *self._decode_photo(request, contract))

    def _decode_photo(self, request: DetectRequest, contract: ModelContract) -> tuple[Image.Image, tuple[int, int]]:
        """The photo decoded (within the decode budget) and its upright original size."""
        if (request.image is None) == (request.tensor is None):
            raise InvalidArgument("a request needs exactly one of an encoded image or a tensor")
        if request.image is not None:
            with self.decoding.hold(min(header_pixels(request.image), self.limits.max_image_pixels)):
                image = self._decode(request.image, contract)
        else:
            image = Image.fromarray(tensor_to_hwc(request.tensor, self.limits.max_image_pixels))
        return image, upright_size(request.image, image)

    def _find_photo_faces(self, request: DetectRequest, contract: ModelContract, image: Image.Image, original: tuple[int, int]):
        """`_prepare_photo` after decoding: the faces of the decoded photo."""
        try:
            detector = self.detectors.get()
        except UserError as error:
            raise ModelNotReady(f"photo input: {error}") from None
        found = find_faces(detector, image, original, contract, request.input_kind, self.limits.max_faces, self.limits.min_face)
        if found.aligned:
            picture, region = self._picture(image, request, contract)
            return picture, region, prepare(image, contract)[None]
        picture, scale = None, 1.0
        if request.heatmap in ("png", "overlay") and found.scored:
            size, _ = heatmaps.bounded(image.size, None, self.limits.max_heatmap_side)
            scale = size[0] / image.width
            picture = np.asarray(image if size == image.size else image.resize(size, RESAMPLING))
        return Photo(found, image, picture, scale)

    def _picture(self, image: Image.Image | None, request: DetectRequest, contract: ModelContract):
        """The bounded picture a PNG heatmap is drawn at, and the model's region on it (None, None
        when the request wants no picture)."""
        if image is None or request.heatmap not in ("png", "overlay"):
            return None, None
        size, region = heatmaps.bounded(image.size, input_region(image.size, contract), self.limits.max_heatmap_side)
        if size != image.size:
            image = image.resize(size, RESAMPLING)
        return np.asarray(image), region


def needed_side(contract: ModelContract) -> int:
    """The shorter side an image needs for the model's preprocessing (its scale, or the input size)."""
    return contract.scale if contract.scale != LEGACY_SCALE else max(contract.input_height, contract.input_width)


def header_pixels(data: bytes) -> int:
    """Pixels an encoded image claims in its header (0 when the header does not read: decoding then
    names the problem)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - bad bytes are decode_image's to report
        return 0
    return width * height


async def run_in_chunks(batcher, images: np.ndarray, deadline: float | None) -> dict[str, np.ndarray]:
    """Raw inference of uint8 [B,3,H,W] through `batcher`; outputs in row order.

    A request of at most max_batch_size rows is queued whole. A larger one never makes one
    outsized engine call: it runs in pieces of `batcher.bulk_rows` (max_batch_size / 8) rows, each
    queued when the one before it is done and as bulk work (see serving.batcher: a low-priority lane
    of its own, or the engine when no ordinary request waits), so other callers' requests do not
    wait for the whole request.
    """
    bulk = len(images) > batcher.max_batch_size
    step = batcher.bulk_rows if bulk else len(images)
    results = [await batcher.submit(images[start : start + step], deadline, bulk) for start in range(0, len(images), step)]
    if len(results) == 1:
        return results[0].outputs
    return {name: np.concatenate([result.outputs[name] for result in results]) for name in results[0].outputs}


@dataclasses.dataclass
class Photo:
    found: object  # serving.faces.Found
    image: Image.Image  # the decoded picture
    picture: np.ndarray | None  # the picture CAMs are drawn on (png / overlay heatmaps), at `scale`
    scale: float


def needs_pool(request: DetectRequest, contract: ModelContract) -> bool:
    """Whether preparing a request takes real work (decoding or resizing) for the worker pool."""
    tensor = request.tensor
    if request.image is not None or tensor is None or tensor.ndim != 3:
        return True
    size = (contract.input_height, contract.input_width)
    return not (tuple(tensor.shape[1:]) == size or tuple(tensor.shape[:2]) == size)


def tensor_to_hwc(tensor: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Validate a uint8 RGB tensor given as [3,H,W] or [H,W,3] and return it as [H,W,3]."""
    if tensor.dtype != np.uint8:
        raise InvalidArgument(f"tensor dtype {tensor.dtype}: expected uint8")
    if tensor.ndim != 3 or 3 not in (tensor.shape[0], tensor.shape[2]):
        raise InvalidArgument(f"tensor shape {list(tensor.shape)}: expected [3, H, W] or [H, W, 3]")
    hwc = tensor.transpose(1, 2, 0) if tensor.shape[0] == 3 else tensor
    height, width = hwc.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise InvalidArgument(f"tensor {height}x{width} is too small (at least {MIN_SIDE} pixels a side)")
    if height * width > max_pixels:
        raise InvalidArgument(f"tensor {height}x{width} pixels is over the {max_pixels}-pixel limit")
    return hwc  # a view; copied where it is resized or laid out as the model input
