"""``python -m examples.video_qa``: see :mod:`examples.video_qa.train` and ``--help``."""

from .train import cli

if __name__ == "__main__":
    cli()
