"""The ``i2v`` command: a thin layer that parses options, calls the library and reports."""

from __future__ import annotations

import click

from .common import CONTEXT_SETTINGS, I2VGroup
from .features import features
from .similar import similar
from .tag import tag
from .weights import weights


@click.group(cls=I2VGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="i2v", prog_name="i2v")
def cli() -> None:
    """Tag anime-style illustrations and turn them into semantic vectors (Illustration2Vec).

    \b
    Get the weights once:   i2v weights download
    Tag a folder:           i2v tag ./illustrations --threshold 0.5 -o tags.jsonl
    """


cli.add_command(tag)
cli.add_command(weights)
cli.add_command(features)
cli.add_command(similar)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="i2v")
