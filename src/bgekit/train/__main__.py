"""``python -m bgekit.train ...`` (and ``torchrun ... -m bgekit.train ...``): the ``bgekit`` CLI."""

from bgekit.cli import app

if __name__ == "__main__":
    app()
