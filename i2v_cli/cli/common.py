"""What the CLI commands share: option decorators, the progress bar, and turning library errors into
one-line messages with the right exit status (0 all done, 1 some inputs failed, 2 usage error, 130 Ctrl-C)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from tqdm import tqdm

from ..errors import I2VError
from ..inference import BACKENDS, PRECISIONS

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class UsageFailure(click.ClickException):
    """A user's mistake reported in one line, exit status 2."""

    exit_code = EXIT_USAGE


class I2VGroup(click.Group):
    """A group whose commands turn library errors into one-line messages and Ctrl-C into exit 130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except I2VError as exc:
            raise UsageFailure(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("i2v: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)


def default_workers() -> int:
    """Decoding workers by default: one per core, at most 4 (the network itself uses the remaining time)."""
    return max(1, min(4, os.cpu_count() or 1))


def model_options(f: F) -> F:
    """--weights, --device, --batch-size, --workers, --precision and --backend: how to run a network."""
    for option in reversed(
        [
            click.option(
                "--weights",
                "-w",
                metavar="FILE",
                help="Weight file (.safetensors, .caffemodel or .pth). "
                "Default: $I2V_WEIGHTS, then the cache filled by `i2v weights download`.",
            ),
            click.option(
                "--device",
                default="auto",
                show_default=True,
                metavar="auto|cpu|cuda[:N]",
                help="Where the network runs.",
            ),
            click.option(
                "--batch-size",
                "-b",
                type=click.IntRange(1),
                default=16,
                show_default=True,
                help="Images per network call.",
            ),
            click.option(
                "--workers",
                "-j",
                type=click.IntRange(0),
                default=None,
                help="Processes decoding images (0: in the main process). Default: cores, at most 4.",
            ),
            click.option(
                "--precision",
                type=click.Choice(PRECISIONS),
                default="fp32",
                show_default=True,
                help="Arithmetic of the network. fp32 gives the reference scores; bf16 (CPU or CUDA) and fp16 "
                "(CUDA) are faster and move scores by about 1e-2.",
            ),
            click.option(
                "--backend",
                type=click.Choice(BACKENDS),
                default="auto",
                show_default=True,
                help="What runs the network. auto: ONNX Runtime for fp32 on a CPU when installed "
                "(pip install 'i2v[onnx]'), else PyTorch.",
            ),
        ]
    ):
        f = option(f)
    return f


def input_options(f: F) -> F:
    """PATH... arguments with --recursive and -0: what to process."""
    for option in reversed(
        [
            click.argument("paths", nargs=-1, required=True, metavar="PATH..."),
            click.option("--recursive", "-r", is_flag=True, help="Look for images in sub-folders too."),
            click.option(
                "--null",
                "-0",
                "nul",
                is_flag=True,
                help="Paths read from '-' are NUL-separated (as `find -print0` writes).",
            ),
        ]
    ):
        f = option(f)
    return f


def progress_option(f: F) -> F:
    """--progress/--no-progress: the bar shows on a terminal's stderr by default, never on stdout."""
    return click.option(
        "--progress/--no-progress",
        default=None,
        help="Show a progress bar on stderr (default: when stderr is a terminal).",
    )(f)


def progress_bar(total: int | None, enabled: bool | None, unit: str = "img", desc: str | None = None) -> tqdm:
    """A tqdm bar on stderr, shown when asked for or when stderr is a terminal."""
    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, disable=not show, file=sys.stderr, unit=unit, desc=desc, dynamic_ncols=True)


def report_failure(bar: tqdm | None, path: str, error: str) -> None:
    """One line on stderr for an input that failed, kept clear of the progress bar."""
    shown = os.fsencode(path).decode("utf-8", "backslashreplace")
    error = os.fsencode(error).decode("utf-8", "backslashreplace")
    # Decoding errors name their file already; others get it in front.
    line = f"i2v: {error}" if error.startswith(shown) else f"i2v: {shown}: {error}"
    if bar is None or bar.disable:
        click.echo(line, err=True)
    else:
        bar.write(line, file=sys.stderr)
