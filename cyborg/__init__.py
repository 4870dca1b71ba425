"""cyborg: tell real face photos from GAN-generated ones, and show why. This package is the `cyborg` command."""

from core import __version__  # noqa: F401  (`cyborg --version`)
