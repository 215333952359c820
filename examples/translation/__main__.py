"""``python -m examples.translation``: see :mod:`examples.translation.train` and ``--help``."""

from .train import cli

if __name__ == "__main__":
    cli()
