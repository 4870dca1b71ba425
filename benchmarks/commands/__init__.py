"""The `cyborg bench` subcommands' argument parsers, and the argparse types they share."""

from __future__ import annotations

import argparse


def positive_ints(text: str) -> list[int]:
    """argparse type: a comma-separated list of positive integers such as 1,4,16 (ArgumentTypeError otherwise)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated positive integers, e.g. 1,4,16")
    return values
