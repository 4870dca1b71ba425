"""The `cyborg` command: every sub-command parses, and only its own module is imported."""

import subprocess
import sys

import pytest

from cyborg.cli import COMMANDS, build_parser, chosen_command


@pytest.mark.parametrize("words", sorted(COMMANDS))
def test_every_command_has_help(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser([*words, "--help"]).parse_args([*words, "--help"])
    assert exit_info.value.code == 0
    assert "usage: cyborg " + " ".join(words) in capsys.readouterr().out


def test_option_values_are_not_command_words():
    assert chosen_command(["--log-level", "DEBUG", "serve", "--port", "1"]) == ("serve",)
    assert chosen_command(["--log-level=DEBUG", "models", "list"]) == ("models", "list")
    args = build_parser(["--log-level", "DEBUG", "serve", "--port", "1"]).parse_args(["--log-level", "DEBUG", "serve", "--port", "1"])
    assert args.port == 1 and args.log_level == "DEBUG"


@pytest.mark.parametrize("words", [("serve",), ("detect",), ("models", "list"), ("bench", "serve")])
def test_serving_commands_never_import_torch(words):
    code = (
        "import sys; from cyborg.cli import build_parser; "
        f"build_parser({list(words)!r}); import serving.server, serving.client, benchmarks.serve; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
