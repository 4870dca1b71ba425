"""`cyborg annotate DATA --out SESSION`: collect human saliency maps in the browser.

Starts the web app (annotate.app) on http://127.0.0.1:8080/ : each annotator judges the images of DATA
real or fake in a seeded order and paints the regions that support the decision; every answer is saved
as it is given under SESSION (training.annotations), and a later visit resumes. `cyborg saliency merge
SESSION --out MAPS` (or --maps MAPS here, on exit) averages the annotators into the maps folder that
`cyborg train --heatmaps` reads. With --server, the /check page sends a photo to a running `cyborg serve`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_PORT = 8080


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="plain-layout folder, or the root the CSV's paths hang from")
    parser.add_argument("--csv", metavar="FILE", help="the authors' CSV (split,class,path[,source])")
    parser.add_argument("--out", metavar="SESSION", required=True, help="session folder: answers and stroke masks (resumed when it exists)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every annotator's image order (default: 0)")
    parser.add_argument("--repeats", type=int, default=1, metavar="N", help="times each annotator is shown each image (default: 1)")
    parser.add_argument("--show-label", action="store_true",
                        help="show each image's label (default: hidden, the authors' protocol, which measures human accuracy)")  # fmt: skip
    parser.add_argument("--maps", metavar="MAPS_DIR", help="on exit, merge the answers into MAPS_DIR (as `cyborg saliency merge`)")
    web = parser.add_argument_group("web app")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; any other needs --app-token-file)")
    web.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0 picks a free one)")
    web.add_argument("--app-token-file", type=Path, metavar="FILE",
                     help="file holding the token annotators must present (the printed link carries it)")  # fmt: skip
    web.add_argument("--app-tls-cert", type=Path, metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    web.add_argument("--app-tls-key", type=Path, metavar="FILE", help="and this private key (PEM)")
    check = parser.add_argument_group("the check-a-photo page (a client of `cyborg serve`, options as `cyborg detect`)")
    check.add_argument("--server", default=os.environ.get("CYBORG_SERVER"),
                       help="HOST:PORT of the gRPC server (default: $CYBORG_SERVER; without it the page is off)")  # fmt: skip
    check.add_argument("--model", default="", help="model name (default: the server's default model)")
    check.add_argument("--version", type=int, default=0, help="model version (default: the latest)")
    check.add_argument("--operating-point", default="", metavar="NAME|NUMBER", help="as `cyborg detect --operating-point`")
    check.add_argument("--input-kind", choices=("auto", "photo", "aligned"), default="auto",
                       help="as `cyborg detect --input-kind` (default: auto, every face of a photo)")  # fmt: skip
    check.add_argument("--tls-ca", type=Path, metavar="FILE", help="CA certificate (PEM): connect with TLS")
    check.add_argument("--tls-cert", type=Path, metavar="FILE", help="client certificate (PEM) for mutual TLS")
    check.add_argument("--tls-key", type=Path, metavar="FILE", help="client private key (PEM) for mutual TLS")
    check.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the server's bearer token")
    check.add_argument("--timeout", type=float, default=30.0, help="seconds per call to the server (default: 30)")


def read_secret(path: Path, flag: str) -> str:
    from core.errors import UserError

    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    token = path.read_text().strip()
    if len(token) < 16:
        raise UserError(f"{flag} {path}: a token of at least 16 characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)")
    return token


def check_options(args: argparse.Namespace) -> str | None:
    """Refuse unsafe or inconsistent options before anything starts; returns the app's token."""
    from core.errors import UserError

    from annotate.app import is_loopback

    token = read_secret(args.app_token_file, "--app-token-file") if args.app_token_file else None
    if not is_loopback(args.host) and token is None:
        raise UserError(f"--host {args.host}: listening beyond this machine needs --app-token-file (annotators open the printed link)")
    if bool(args.app_tls_cert) != bool(args.app_tls_key):
        raise UserError("--app-tls-cert and --app-tls-key go together")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together (mutual TLS)")
    for flag in ("tls_ca", "tls_cert", "tls_key", "token_file", "app_tls_cert", "app_tls_key"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise UserError(f"--{flag.replace('_', '-')} {path}: no such file")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port}: 0-65535")
    return token


def make_checker(args: argparse.Namespace):
    if not args.server:
        return None
    from annotate.app import PhotoChecker
    from serving.commands.detect import check_operating_point, read_token

    check_operating_point(args.operating_point)
    token = read_token(args.token_file) if args.token_file else None
    return PhotoChecker(args.server, model=args.model, version=args.version, operating_point=args.operating_point,
                        input_kind=args.input_kind, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, token=token, timeout=args.timeout)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import asyncio
    import signal
    import ssl

    from annotate.app import AppConfig, create_app, is_loopback, start
    from training.annotations import Session, format_report, merge

    token = check_options(args)
    session = Session.create_or_open(args.out, args.data, args.csv, seed=args.seed, repeats=args.repeats, show_label=args.show_label)
    checker = make_checker(args)
    ssl_context = None
    if args.app_tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.app_tls_cert, args.app_tls_key)
    config = AppConfig(session=session, token=token, loopback_only=is_loopback(args.host), checker=checker)

    async def serve() -> None:
        runner, port = await start(create_app(config), args.host, args.port, ssl_context)
        scheme = "https" if ssl_context else "http"
        host = "127.0.0.1" if is_loopback(args.host) else args.host
        link = f"{scheme}://{host}:{port}/" + (f"?token={token}" if token else "")
        print(f"annotating {len(session.items)} images of {session.data} ({session.repeats} time(s) each per annotator); answers in {session.root}")
        print(f"open {link}   (add &annotator=NAME or ?annotator=NAME to name the annotator in the link)")
        if checker is not None:
            print(f"check a photo: {link.replace('/?', '/check?') if token else link + 'check'}  (server {args.server})")
        print("Ctrl+C stops", flush=True)
        stop = asyncio.Event()
        for signal_number in (signal.SIGINT, signal.SIGTERM):  # both end it cleanly (and merge with --maps)
            asyncio.get_running_loop().add_signal_handler(signal_number, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    finally:
        if checker is not None:
            checker.close()
    if args.maps:
        print(format_report(merge(session, args.maps)))
    return 0
