"""``i2v weights calibrate``: the calibration set ``--precision int8`` quantises the networks with."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..atomic import describe_oserror, same_file
from ..config import CALIBRATION_COUNT, CALIBRATION_ENV
from ..errors import CalibrationError, OutputError
from ..inputs import expand_inputs
from .common import CONTEXT_SETTINGS, EXIT_SOME_FAILED, input_options, report_failure, stdin_for


@click.command(context_settings=CONTEXT_SETTINGS)
@input_options
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The calibration file to write (.npz). Default: calibration.npz in the cache, which int8 then uses.",
)
@click.option(
    "--count",
    "-n",
    type=click.IntRange(1, 4096),
    default=CALIBRATION_COUNT,
    show_default=True,
    help="Images to keep, spread evenly over the inputs when there are more.",
)
def calibrate(paths: tuple[str, ...], recursive: bool, nul: bool, output: Path | None, count: int) -> None:
    """Make the calibration set for --precision int8 from your own illustrations.

    int8 quantises each network once, from the activations it sees on a calibration set; without one it
    uses a built-in synthetic set. A few dozen to a few hundred images like the ones you will tag make the
    int8 scores closer to fp32's. The images are resized as i2v does and kept as 224x224 pixels (N x 147 KB).
    Written to the cache by default, where int8 finds it; elsewhere, name it with $I2V_CALIBRATION.

    \b
    Example:
      i2v weights calibrate ./my-illustrations -r
      I2V_CALIBRATION=cal.npz i2v tag ./folder --precision int8   (after: i2v weights calibrate ... -o cal.npz)
    """
    from ..writers import check_output, display

    inputs = expand_inputs(paths, recursive=recursive, stdin=stdin_for(paths), nul=nul)
    if output is not None and any(same_file(output, p) for p in inputs):
        raise OutputError(f"{display(str(output))} is one of the input images: write the calibration set elsewhere")
    if output is not None and str(output) == "-":
        raise OutputError("-o -: the calibration set is a file that int8 reads later; name one (cal.npz)")
    if output is not None:
        check_output(str(output), writes=("zip",))  # an .npz is a zip archive
    from ..quantize import default_calibration_file, images_from_files, save_calibration  # brings torch

    images, used, failed = images_from_files(inputs, count)
    for path, error in failed:
        report_failure(None, path, error)
    if not used:
        raise CalibrationError("no image could be read: the calibration set would be empty")
    target = output or default_calibration_file()
    if output is None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(describe_oserror(target, exc)) from None
    save_calibration(images, target)
    shown = display(str(target))
    where = "" if output is None else f" (int8 uses it with {CALIBRATION_ENV}={shown})"
    click.echo(f"{shown}: {len(used)} images{where}", err=True)
    if failed:
        sys.exit(EXIT_SOME_FAILED)
