"""The `cyborg` command.

Each sub-command lives in its own module with `HELP`, `add_arguments(parser)` and
`run(args) -> int`. Those modules import only the standard library at module level, so
`cyborg serve` works where torch is not installed, and torch loads only for training commands.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from cyborg import __version__
from cyborg.errors import UserError

# (command words) -> module implementing it
COMMANDS: dict[tuple[str, ...], str] = {
    ("data", "check"): "training.commands.data_check",
    ("saliency", "prior"): "training.commands.saliency_prior",
    ("train",): "training.commands.train",
    ("evaluate",): "training.commands.evaluate",
    ("export",): "training.commands.export",
    ("models", "list"): "serving.commands.models_list",
    ("serve",): "serving.commands.serve",
    ("detect",): "serving.commands.detect",
    ("bench", "train"): "training.commands.bench_train",
    ("bench", "guidance"): "training.commands.bench_guidance",
    ("bench", "serve"): "serving.commands.bench_serve",
}

GROUP_HELP = {
    "data": "inspect training data",
    "saliency": "prepare saliency maps",
    "models": "inspect a model repository",
    "bench": "benchmarks that print measured figures",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cyborg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cyborg {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        if len(words) == 1:
            sub = top.add_parser(words[0], help=module.HELP, description=module.HELP)
        else:
            group, name = words
            if group not in groups:
                group_parser = top.add_parser(group, help=GROUP_HELP[group])
                groups[group] = group_parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            sub = groups[group].add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UserError as error:  # a problem with the user's input: one clear line, no traceback
        print(f"cyborg: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
