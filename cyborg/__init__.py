"""cyborg: tell real face photos from GAN-generated ones, and show why."""

__version__ = "0.1.0"
