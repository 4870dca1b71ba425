"""`cyborg serve`: run the gRPC inference server on a model repository.

Each flag is a `serving.server.ServerConfig` field of the same name: its default is the field's
(stated once, in ServerConfig), and `config_from_args` copies every field across by name.
"""

from __future__ import annotations

import argparse
import dataclasses

# ServerConfig field -> (argparse options, help; "{default}" is replaced by the field's default)
FLAGS: dict[str, tuple[dict, str]] = {
    "model_repository": ({}, "folder of <name>/<version>/model.onnx + model.json (default: {default})"),
    "host": ({}, "address to listen on (default: {default})"),
    "port": ({"type": int}, "gRPC port (default: {default}; 0 = any free port)"),
    "metrics_port": ({"type": int}, "Prometheus /metrics HTTP port (default: {default}; -1 = off)"),
    "metrics_host": ({}, "address /metrics listens on (default: 127.0.0.1 when TLS or --auth-token-file is on, else --host)"),
    "metrics_auth": ({"action": "store_true"}, "/metrics needs 'Authorization: Bearer <token>' with a token of --auth-token-file"),
    "default_model": ({}, "model for requests that name none (default: the only/first model)"),
    "version_policy": ({"metavar": "POLICY"}, "versions of each model to serve, as Triton's version_policy: latest (the newest that loads), latest:N (the N newest that load), all, or version numbers such as 6,7; a request's version picks one, 0 the newest or --default-version (default: {default})"),
    "default_version": ({"type": int, "metavar": "N"}, "version of the default model for requests that name none, while it is loaded (else the newest, with a warning); --version-policy must serve it (default: {default} = the newest served)"),
    "max_batch_size": ({"type": int}, "override every model's batching.max_batch_size"),
    "max_queue_delay_ms": ({"type": float}, "override every model's batching.max_queue_delay_ms"),
    "max_queue_size": ({"type": int}, "override every model's batching.max_queue_size (requests)"),
    "instances": ({"type": int}, "batches of one model that may run at once (default: {default})"),
    "poll_seconds": ({"type": float}, "rescan the repository this often (default: {default} = only on SIGHUP)"),
    "backend": ({"choices": ("auto", "onnxruntime", "tensorrt")}, "engine (default: {default})"),
    "device": ({"choices": ("auto", "cpu", "cuda")}, "device (default: {default})"),
    "intra_op_threads": ({"type": int}, "ONNX Runtime intra-op threads (default: {default} = one per core)"),
    "decode_workers": ({"type": int}, "image decoding threads (default: {default} = one per core)"),
    "max_message_mb": ({"type": int}, "largest gRPC message and encoded image in MiB (default: {default})"),
    "max_image_pixels": ({"type": int}, "largest decoded image in pixels (default: {default})"),
    "max_decode_pixels": ({"type": int}, "pixels being decoded at once, server-wide; more is RESOURCE_EXHAUSTED (default: {default} = --max-image-pixels + 16000000)"),
    "low_priority_pixels": ({"type": int}, "images over this many pixels are decoded and drawn on low-priority (nice 19) threads (default: {default}; 0 = never)"),
    "bulk_lane": ({"action": argparse.BooleanOptionalAction}, "ModelInfer requests over the batch size run in small pieces on a second, one-thread ONNX Runtime engine at low priority, beside ordinary requests (CPU only; default: on)"),
    "max_heatmap_side": ({"type": int}, "longest side of PNG heatmaps and overlays in pixels (default: {default})"),
    "max_batch_items": ({"type": int}, "items in one DetectBatch call (default: {default})"),
    "max_faces": ({"type": int}, "faces scored in one photo, largest first; the rest are reported as over the limit (default: {default})"),
    "min_face": ({"type": int}, "smallest face scored in a photo: the side of its aligned square in pixels (default: {default})"),
    "model_load_api": ({"action": "store_true"}, "serve RepositoryModelLoad / RepositoryModelUnload (tritonclient's load_model / unload_model): any caller (any token holder, with --auth-token-file) may then unload a model"),
    "tls_cert": ({}, "server certificate (PEM) for TLS"),
    "tls_key": ({}, "server private key (PEM) for TLS"),
    "tls_client_ca": ({}, "CA (PEM) that client certificates must chain to: mutual TLS"),
    "auth_token_file": ({}, "file of accepted bearer tokens, one a line"),
    "grace_seconds": ({"type": float}, "time in-flight calls get at shutdown (default: {default})"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from serving.server import ServerConfig

    defaults = ServerConfig()
    for field, (options, help_text) in FLAGS.items():
        default = getattr(defaults, field)
        if field == "metrics_port":
            default = -1 if default is None else default
        shown = f"{default:g}" if isinstance(default, float) else default
        parser.add_argument(f"--{field.replace('_', '-')}", default=default, help=help_text.format(default=shown), **options)
    parser.add_argument("--log-format", choices=("json", "text"), default="json", help="log lines as JSON objects or text (default: json)")


def config_from_args(args: argparse.Namespace):
    from core.errors import UserError
    from serving.repository import VersionPolicy
    from serving.server import ServerConfig

    VersionPolicy.parse(args.version_policy).check_default(args.default_version)  # a bad policy or default version fails here, naming the flags
    for flag in ("max_batch_size", "max_queue_size", "instances", "max_message_mb", "max_image_pixels", "max_heatmap_side", "max_batch_items", "max_faces", "min_face"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    if args.max_decode_pixels and args.max_decode_pixels < args.max_image_pixels:
        raise UserError(f"--max-decode-pixels {args.max_decode_pixels}: at least --max-image-pixels ({args.max_image_pixels}), or 0 for the default")
    if args.low_priority_pixels < 0:
        raise UserError(f"--low-priority-pixels {args.low_priority_pixels}: must not be negative (0 = never)")
    if args.max_queue_delay_ms is not None and args.max_queue_delay_ms < 0:
        raise UserError(f"--max-queue-delay-ms {args.max_queue_delay_ms}: must not be negative")
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(ServerConfig) if field.name in FLAGS}
    values["metrics_port"] = None if args.metrics_port < 0 else args.metrics_port
    return ServerConfig(**values)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from serving.server import serve, use_json_logs

    config = config_from_args(args)
    if args.log_format == "json":
        use_json_logs()
    cancelled = asyncio.run(serve(config))
    return 1 if cancelled else 0  # 1: shutdown cut off calls (the last log line says how many)
