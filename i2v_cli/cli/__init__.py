"""The ``i2v`` command: a thin layer that parses options, calls the library and reports.

Commands are imported when they run (not for ``i2v --help``), so the help answers without loading torch.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from .common import CONTEXT_SETTINGS, I2VGroup, exit_status, install_signal_handlers, show_warnings

#: Command name -> (module, one-line help shown by ``i2v --help``).
COMMANDS = {
    "tag": ("tag", "Tag images: files, folders, glob patterns, or '-' to read paths from stdin."),
    "features": ("features", "Extract semantic features (the feature model's encode1) of images."),
    "similar": ("similar", "Find the indexed images most similar to each QUERY."),
    "index": ("index", "Index images into an SQLite collection: tags, features, kept current incrementally."),
    "search": ("search", "Search an index by tags (booru-style query) and by similarity (--like IMAGE)."),
    "dupes": ("dupes", "Find groups of near-duplicate images in an index, each with the copy to keep."),
    "export": ("export", "Write an index's tags as sidecars beside the images: XMP keywords or Hydrus tag files."),
    "serve": ("serve", "Serve tagging, features and an index over HTTP: a JSON API and a web page."),
    "weights": ("weights", "Download, convert and inspect weight files."),
}


class LazyGroup(I2VGroup):
    """The top-level group: each command's module is imported only when that command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module = importlib.import_module(f".{COMMANDS[cmd_name][0]}", __package__)
        return getattr(module, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in COMMANDS.items()])


def _version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """--version: i2v's, and what runs the networks here (torch, ONNX Runtime, devices)."""
    if not value or ctx.resilient_parsing:
        return
    from .. import __version__

    lines = [f"i2v {__version__}"]
    try:
        import torch

        devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
        lines.append(f"torch {torch.__version__}; devices: {', '.join(devices)}")
    except ImportError:
        lines.append("torch: not installed")
    try:
        import onnxruntime

        lines.append(f"onnxruntime {onnxruntime.__version__}")
    except ImportError:
        lines.append("onnxruntime: not installed (optional: pip install onnx onnxruntime)")
    click.echo("\n".join(lines))
    ctx.exit(0)


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS, no_args_is_help=True)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="Show the version of i2v, torch and ONNX Runtime, and the devices seen, and exit.")  # fmt: skip
def cli() -> None:
    """Tag anime-style illustrations and turn them into semantic vectors (Illustration2Vec).

    \b
    Get the weights once:   i2v weights download
    Tag a folder:           i2v tag ./illustrations --threshold 0.5 -o tags.jsonl
    Shell completion (bash): eval "$(_I2V_COMPLETE=bash_source i2v)"   (zsh_source, fish_source)
    """


def main() -> Any:
    """Console-script entry point: signals first (SIGTERM and SIGHUP stop a run as Ctrl-C does), then the CLI."""
    install_signal_handlers()
    show_warnings()
    try:
        return cli(prog_name="i2v")
    except KeyboardInterrupt as exc:  # before or after a command ran: no traceback either way
        sys.exit(exit_status(exc))
