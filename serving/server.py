"""The gRPC server: `create_server(config) -> (server, port)`, and `serve(config)` to run it.

One grpc.aio server carries the Detector API, the Open Inference Protocol (KServe v2), health
checking (grpc.health.v1: the overall "" service, each protocol and each model by name; NOT_SERVING
until the models are warm and again from the start of shutdown) and reflection. Interceptors add
bearer-token auth and map errors to status codes; Prometheus metrics are served over HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from core.errors import UserError
from serving import inference_servicer, servicer
from serving.auth import BearerTokenInterceptor, read_tokens
from serving.dataplane import LOW_PRIORITY_PIXELS, DataPlane, Limits
from serving.errors import ErrorInterceptor, wrap_handler
from serving.metrics import Metrics
from serving.repository import ModelRepository, RepositorySettings, VersionPolicy
from serving.workers import low_priority_pool

log = logging.getLogger(__name__)
MiB = 1024 * 1024
MMAP_THRESHOLD = 8 * MiB  # allocations over this get their own mapping, returned to the system when freed
TRIM_THRESHOLD = 16 * MiB  # free memory a heap keeps at its top before giving it back (glibc's own 2x)
PROTOCOLS = (servicer, inference_servicer)  # modules with add_to_server(server, dataplane) -> service name


@dataclasses.dataclass
class ServerConfig:
    model_repository: str = "models"
    host: str = "0.0.0.0"
    port: int = 8001  # 0: any free port
    metrics_port: int | None = 8002  # None: no metrics endpoint; 0: any free port
    metrics_host: str = ""  # "": loopback when TLS or a token is on, else `host`
    metrics_auth: bool = False  # /metrics needs a bearer token of auth_token_file
    default_model: str = ""
    version_policy: str = "latest"  # versions of each model served: latest, latest:N, all, or numbers like 6,7 (serving.repository.VersionPolicy)
    default_version: int = 0  # the default model's version for requests that name none (while loaded); 0: the newest served
    max_batch_size: int | None = None  # None: each model's model.json
    max_queue_delay_ms: float | None = None
    max_queue_size: int | None = None
    instances: int = 1  # batches of one model that may run at once (Triton's instance count)
    poll_seconds: float = 0.0  # 0: no polling (reload on SIGHUP or through the API only)
    backend: str = "auto"
    device: str = "auto"
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per core)
    decode_workers: int = 0  # 0: one per core
    max_message_mb: int = 32
    max_image_pixels: int = 64_000_000
    max_decode_pixels: int = 0  # pixels being decoded at once, server-wide; 0: max_image_pixels + 16,000,000
    max_heatmap_side: int = 1024  # longest side of PNG heatmaps and overlays
    low_priority_pixels: int = LOW_PRIORITY_PIXELS  # images over this: decoded and drawn on low-priority threads; 0: never
    bulk_lane: bool = True  # large ModelInfer requests on a second, one-thread, low-priority engine (ONNX Runtime on CPU)
    model_load_api: bool = False  # the Open Inference Protocol's RepositoryModelLoad / RepositoryModelUnload
    max_batch_items: int = 1024  # items in one DetectBatch call
    max_faces: int = 32  # faces scored in one photo (photo / auto input)
    min_face: int = 64  # smallest face scored: the side of its FFHQ square in original pixels
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # set: mutual TLS, client certificates required
    auth_token_file: str = ""
    grace_seconds: float = 10.0
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    limit = int(config.max_message_mb * MiB)
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (and mutual TLS with a client CA) credentials, or None for plaintext."""
    if not (config.tls_cert or config.tls_key):
        if config.tls_client_ca:
            raise UserError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (config.tls_cert and config.tls_key):
        raise UserError("TLS needs both --tls-cert and --tls-key")

    def read(path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise UserError(f"{path}: cannot read ({error.strerror})") from error

    client_ca = read(config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(config.tls_key), read(config.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 whose Watch streams end after telling NOT_SERVING at shutdown.

    The stock servicer keeps every Watch open until the server cancels it, so one watching load
    balancer would hold each graceful shutdown for the whole grace period.
    """

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed = asyncio.Condition()
        self._closing = False

    async def set(self, service: str, status: int) -> None:
        await super().set(service, status)
        if not self._closing:
            self._statuses[service] = status
        async with self._changed:
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._closing = True
        self._statuses = dict.fromkeys(self._statuses, health_pb2.HealthCheckResponse.NOT_SERVING)
        async with self._changed:
            self._changed.notify_all()

    async def Watch(self, request, context) -> None:
        last = None
        async with self._changed:
            while True:
                status = self._statuses.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                if self._closing:
                    return
                await self._changed.wait()


class CallTracker(grpc.aio.ServerInterceptor):
    """Counts the calls in progress, so that shutdown can wait for them and say how many it cut off."""

    def __init__(self) -> None:
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def _exit(self) -> None:
        self.active -= 1
        if not self.active:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Whether every call ended within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def intercept_service(self, continuation, handler_call_details):
        def unary(behaviour):
            async def counted(request_or_iterator, context):
                self._enter()
                try:
                    return await behaviour(request_or_iterator, context)
                finally:
                    self._exit()

            return counted

        def stream(behaviour):
            async def counted(request_or_iterator, context):
                self._enter()
                try:
                    async for response in behaviour(request_or_iterator, context):
                        yield response
                finally:
                    self._exit()

            return counted

        return wrap_handler(await continuation(handler_call_details), unary=unary, stream=stream)


class Server:
    """The running parts of one server; `start()`, `stop(grace)`, `wait_for_termination()`."""

    def __init__(self, config: ServerConfig, grpc_server: grpc.aio.Server, dataplane: DataPlane, health_servicer, services: list[str], calls: CallTracker | None = None):
        self.config = config
        self.grpc_server = grpc_server
        self.dataplane = dataplane
        self.repository = dataplane.repository
        self.metrics = dataplane.metrics
        self.health = health_servicer
        self.services = services
        self.calls = calls or CallTracker()
        self.cancelled_calls = 0  # calls still running when the grace period ended (cut off by shutdown)
        self.metrics_port: int | None = None
        self._metrics_http = None
        self._stopping = False
        self._model_names: set[str] = set()

    async def start(self) -> None:
        """Start accepting calls (health NOT_SERVING), load and warm the models, then report SERVING."""
        await self.update_health()
        await self.grpc_server.start()
        if self.config.metrics_port is not None:
            tokens = read_tokens(self.config.auth_token_file) if self.config.metrics_auth else ()
            try:
                http, _thread = self.metrics.serve_http(self.config.metrics_port, metrics_host(self.config), tokens)
            except OSError as error:
                raise UserError(f"--metrics-port {self.config.metrics_port}: cannot listen ({error.strerror})") from error
            self._metrics_http, self.metrics_port = http, http.server_port
        await self.repository.reload()  # calls update_health through on_change
        self.repository.check_default_version()  # the policy served the default model, but not at --default-version
        self.repository.start_polling(self.config.poll_seconds)
        models = [f"{m.contract.name}:{m.contract.version}" for m in self.repository.loaded()]
        log.info("serving %s", ", ".join(models) or "no model yet", extra={"models": models})

    async def update_health(self) -> None:
        """Health from model readiness: "" and each protocol if any model serves, each model by name."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        if self._stopping:
            return
        ready = self.dataplane.ready()
        for name in ("", *self.services):
            await self.health.set(name, serving if ready else not_serving)
        loaded = {model.contract.name for model in self.repository.loaded()}
        names = {status.name for status in self.repository.statuses()}
        for name in sorted(names | self._model_names):  # a model removed from disk reads NOT_SERVING
            await self.health.set(name, serving if name in loaded else not_serving)
        self._model_names |= names

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: health NOT_SERVING, refuse new calls, let in-flight calls finish."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.config.grace_seconds if grace is None else grace
        log.info("shutting down", extra={"grace_seconds": grace})
        await self.health.enter_graceful_shutdown()
        self.dataplane.shutdown()  # open streams answer what they hold and end
        try:
            stopping = asyncio.ensure_future(self.grpc_server.stop(grace))  # refuses new calls at once
            if not await self.calls.wait_idle(grace):
                self.cancelled_calls = self.calls.active
            await stopping
            if self.cancelled_calls:
                log.warning("shutdown cancelled %d calls still running after the %gs grace period", self.cancelled_calls, grace,
                            extra={"cancelled_calls": self.cancelled_calls})  # fmt: skip
            else:
                log.info("shutdown drained every call", extra={"cancelled_calls": 0})
        finally:
            await self.repository.close()
            self.dataplane.pool.shutdown(wait=False)
            if self.dataplane.low_priority_pool is not None:
                self.dataplane.low_priority_pool.shutdown(wait=False)
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
                self._metrics_http.server_close()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


async def create_server(config: ServerConfig) -> tuple[Server, int]:
    """Build the server and bind its port (0 picks a free one); `await server.start()` runs it."""
    if not Path(config.model_repository).is_dir():
        raise UserError(f"--model-repository {config.model_repository}: not a folder")
    credentials = server_credentials(config)
    if config.metrics_auth and not config.auth_token_file:
        raise UserError("--metrics-auth needs --auth-token-file (the tokens /metrics accepts)")
    version_policy = VersionPolicy.parse(config.version_policy)
    version_policy.check_default(config.default_version)
    calls = CallTracker()
    interceptors = [calls, ErrorInterceptor()]
    if config.auth_token_file:
        interceptors.insert(1, BearerTokenInterceptor(read_tokens(config.auth_token_file)))
    grpc_server = grpc.aio.server(interceptors=interceptors, options=grpc_options(config))
    metrics = Metrics()
    settings = RepositorySettings(
        backend=config.backend,
        device=config.device,
        intra_op_threads=config.intra_op_threads,
        max_batch_size=config.max_batch_size,
        max_queue_delay_ms=config.max_queue_delay_ms,
        max_queue_size=config.max_queue_size,
        max_inflight_batches=config.instances,
        default_model=config.default_model,
        bulk_lane=config.bulk_lane,
        version_policy=version_policy,
        default_version=config.default_version,
    )
    repository = ModelRepository(config.model_repository, settings, metrics)
    workers = config.decode_workers or os.cpu_count() or 1
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    low_pool = low_priority_pool(workers, "decode-low") if config.low_priority_pixels > 0 else None
    limits = Limits(
        max_image_bytes=int(config.max_message_mb * MiB),
        max_image_pixels=config.max_image_pixels,
        max_decode_pixels=config.max_decode_pixels,
        max_heatmap_side=config.max_heatmap_side,
        max_batch_items=config.max_batch_items,
        max_faces=config.max_faces,
        min_face=config.min_face,
        low_priority_pixels=config.low_priority_pixels,
    )
    dataplane = DataPlane(repository, pool, metrics, limits, low_pool, config.model_load_api)
    services = [protocol.add_to_server(grpc_server, dataplane) for protocol in PROTOCOLS]
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    enable_reflection(grpc_server, services)
    server = Server(config, grpc_server, dataplane, health_servicer, services, calls)
    repository.on_change = lambda _repository: server.update_health()
    address = f"{config.host}:{config.port}" if ":" not in config.host else f"[{config.host}]:{config.port}"
    try:
        port = grpc_server.add_secure_port(address, credentials) if credentials else grpc_server.add_insecure_port(address)
    except RuntimeError as error:
        raise UserError(f"cannot listen on {address}: {error}") from error
    return server, port


def metrics_host(config: ServerConfig) -> str:
    """Where /metrics listens: --metrics-host, or loopback when TLS or tokens guard the gRPC port
    (an open metrics port beside them would expose what they protect), else --host."""
    if config.metrics_host:
        return config.metrics_host
    return "127.0.0.1" if (config.tls_cert or config.auth_token_file) else config.host


def enable_reflection(grpc_server: grpc.aio.Server, services: list[str]) -> None:
    """Server reflection for every service, the Open Inference Protocol's included.

    Reflection reads one descriptor pool; the KServe descriptors are kept out of protobuf's default
    pool (see serving.inference_servicer), so reflection gets a private pool holding the files of
    every service served.
    """
    from google.protobuf import descriptor_pool
    from grpc_reflection.v1alpha import reflection

    from serving.inference_servicer import SERVICE as INFERENCE, serialized_descriptor

    default = descriptor_pool.Default()
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file) -> None:  # a FileDescriptor from the default pool, after its dependencies
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    names = [health.SERVICE_NAME, reflection.SERVICE_NAME, *services]
    for name in names:
        if name != INFERENCE:
            add(default.FindServiceByName(name).file)
    pool.AddSerializedFile(serialized_descriptor())
    reflection.enable_server_reflection(names, grpc_server, pool=pool)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and any `extra=` fields."""

    RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self.RESERVED})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def use_json_logs() -> None:
    for handler in logging.getLogger().handlers or [logging.StreamHandler()]:
        handler.setFormatter(JsonFormatter())
        if handler not in logging.getLogger().handlers:
            logging.getLogger().addHandler(handler)


def return_large_blocks(threshold: int = MMAP_THRESHOLD, trim: int = TRIM_THRESHOLD) -> bool:
    """Have glibc serve every allocation over `threshold` from a mapping of its own, returned to the
    system when freed, and let a heap keep up to `trim` free bytes at its top; whether it took. By
    default glibc raises the first threshold (up to 32 MB) each time it frees a large block, so
    30 MB request buffers and decoded images come to live in heaps that keep their pages, and the
    server's memory after a burst stays near its peak. Fixing it also fixes the trim threshold at
    128 KB unless set too: heaps would then shrink and grow again around every ordinary request's
    arrays (a decoded 512x512 image, 0.8 MB), 3 ms more a request; and a threshold of 1 MB cost
    about 1 ms of engine time a request (page faults on fresh mappings). Left alone when either
    MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ is set, and where the C library is not glibc."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(-1, trim) == 1 and libc.mallopt(-3, threshold) == 1  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


async def serve(config: ServerConfig) -> int:
    """Run until SIGINT/SIGTERM, then shut down gracefully; SIGHUP reloads the repository. Returns
    the number of calls the shutdown cut off (still running when the grace period ended)."""
    return_large_blocks()
    server, port = await create_server(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(server.repository.reload()))
    try:
        await server.start()
        log.info(
            "listening on %s:%d (metrics: %s)", config.host, port, server.metrics_port or "off",
            extra={"port": port, "metrics_port": server.metrics_port, "tls": bool(config.tls_cert)},
        )  # fmt: skip
        await stop.wait()
    finally:
        await server.stop()
    return server.cancelled_calls
