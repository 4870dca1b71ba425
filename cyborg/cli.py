"""The `cyborg` command.

Each sub-command lives in its own module with `add_arguments(parser)` and `run(args) -> int`,
imported only when that command runs. Those modules import only the standard library at module level, so
`cyborg serve` works where torch is not installed, and torch loads only for training commands.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from core import __version__
from core.errors import UserError

# (command words) -> (module implementing it, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("data", "check"): ("training.commands.data_check", "report problems in a data set (exit 1 on errors)"),
    ("data", "align"): ("training.commands.data_align", "find the faces in photos and write FFHQ-aligned crops"),
    ("saliency", "prior"): ("training.commands.saliency_prior", "write proxy saliency maps for data without human maps"),
    ("saliency", "merge"): ("training.commands.saliency_merge", "average `cyborg annotate` answers into human saliency maps, with a report"),
    ("annotate",): ("annotate.command", "collect human saliency maps in the browser (and check a photo)"),
    ("train",): ("training.commands.train", "train a detector with the CYBORG loss"),
    ("evaluate",): ("training.commands.evaluate", "AUC, EER, accuracy, ROC and CAM pictures for a checkpoint"),
    ("ensemble",): ("training.commands.ensemble", "average several checkpoints into one model (one checkpoint, one graph)"),
    ("norm-statistics",): ("training.commands.norm_statistics", "measure a finished network's BatchNorm statistics again, a share of its images changed"),
    ("export",): ("training.commands.export", "export a checkpoint to ONNX/TensorRT in a model repository"),
    ("checkpoint",): ("training.commands.checkpoint", "rebuild training checkpoints from a published fp32 version (to fine-tune, teach or extend it)"),
    ("models", "list"): ("serving.commands.models_list", "list the models in a model repository"),
    ("serve",): ("serving.commands.serve", "run the gRPC inference server"),
    ("detect",): ("serving.commands.detect", "send images to a server and print scores"),
    ("bench", "train"): ("benchmarks.commands.bench_train", "training step time: CYBORG against CE"),
    ("bench", "guidance"): ("benchmarks.commands.bench_guidance", "compare saliency-guidance methods on a decoy set"),
    ("bench", "serve"): ("benchmarks.commands.bench_serve", "server throughput and latency against in-process ONNX Runtime"),
    ("bench", "gpu"): ("benchmarks.commands.bench_gpu", "the GPU proof: training, export, CUDA / TensorRT engines and serving, as JSON"),
}

GROUP_HELP = {
    "data": "inspect training data",
    "saliency": "prepare saliency maps",
    "models": "inspect a model repository",
    "bench": "benchmarks that print measured figures",
}


TOP_LEVEL_OPTIONS_WITH_VALUE = {"--log-level"}


def chosen_command(argv: Sequence[str]) -> tuple[str, ...] | None:
    """The command words in argv, found without importing any command module."""
    words, tokens = [], iter(argv)
    for token in tokens:
        if token in TOP_LEVEL_OPTIONS_WITH_VALUE:
            next(tokens, None)  # the option's value is no command word
        elif not token.startswith("-"):
            words.append(token)
    for length in (2, 1):
        if tuple(words[:length]) in COMMANDS:
            return tuple(words[:length])
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The full parser; only the module of the command named in argv is imported."""
    parser = argparse.ArgumentParser(prog="cyborg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cyborg {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    chosen = chosen_command(argv)
    for words, (module_name, help_text) in COMMANDS.items():
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text, description=help_text)
        else:
            group, name = words
            if group not in groups:
                group_parser = top.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group])
                groups[group] = group_parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            sub = groups[group].add_parser(name, help=help_text, description=help_text)
        if words == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
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
