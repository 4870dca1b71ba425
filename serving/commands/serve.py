"""`cyborg serve`: run the gRPC inference server on a model repository."""

from __future__ import annotations

import argparse



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", default="models", help="folder of <name>/<version>/model.onnx + model.json (default: models)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8001, help="gRPC port (default: 8001; 0 = any free port)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics HTTP port (default: 8002; -1 = off)")
    parser.add_argument("--default-model", default="", help="model for requests that name none (default: the only/first model)")
    parser.add_argument("--max-batch-size", type=int, help="override every model's batching.max_batch_size")
    parser.add_argument("--max-queue-delay-ms", type=float, help="override every model's batching.max_queue_delay_ms")
    parser.add_argument("--max-queue-size", type=int, help="override every model's batching.max_queue_size (requests)")
    parser.add_argument("--instances", type=int, default=1, help="batches of one model that may run at once (default: 1)")
    parser.add_argument("--poll-seconds", type=float, default=0.0, help="rescan the repository this often (default: 0 = only on SIGHUP)")
    parser.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto", help="engine (default: auto)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (default: auto)")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: 0 = one per core)")
    parser.add_argument("--decode-workers", type=int, default=0, help="image decoding threads (default: 0 = one per core)")
    parser.add_argument("--max-message-mb", type=int, default=32, help="largest gRPC message and encoded image in MiB (default: 32)")
    parser.add_argument("--max-image-pixels", type=int, default=64_000_000, help="largest decoded image in pixels (default: 64000000)")
    parser.add_argument("--tls-cert", default="", help="server certificate (PEM) for TLS")
    parser.add_argument("--tls-key", default="", help="server private key (PEM) for TLS")
    parser.add_argument("--tls-client-ca", default="", help="CA (PEM) that client certificates must chain to: mutual TLS")
    parser.add_argument("--auth-token-file", default="", help="file of accepted bearer tokens, one a line")
    parser.add_argument("--grace-seconds", type=float, default=10.0, help="time in-flight calls get at shutdown (default: 10)")
    parser.add_argument("--log-format", choices=("json", "text"), default="json", help="log lines as JSON objects or text (default: json)")


def config_from_args(args: argparse.Namespace):
    from core.errors import UserError
    from serving.server import ServerConfig

    for flag in ("max_batch_size", "max_queue_size", "instances", "max_message_mb", "max_image_pixels"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    if args.max_queue_delay_ms is not None and args.max_queue_delay_ms < 0:
        raise UserError(f"--max-queue-delay-ms {args.max_queue_delay_ms}: must not be negative")
    return ServerConfig(
        model_repository=args.model_repository,
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        default_model=args.default_model,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        max_queue_size=args.max_queue_size,
        instances=args.instances,
        poll_seconds=args.poll_seconds,
        backend=args.backend,
        device=args.device,
        intra_op_threads=args.intra_op_threads,
        decode_workers=args.decode_workers,
        max_message_mb=args.max_message_mb,
        max_image_pixels=args.max_image_pixels,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file,
        grace_seconds=args.grace_seconds,
    )


def run(args: argparse.Namespace) -> int:
    import asyncio

    from serving.server import serve, use_json_logs

    config = config_from_args(args)
    if args.log_format == "json":
        use_json_logs()
    asyncio.run(serve(config))
    return 0
