"""``i2v weights``: get the release's weights and turn any supported format into safetensors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..store import RELEASE_BASE_URL, default_weights_dir
from .common import CONTEXT_SETTINGS, I2VGroup, progress_option


@click.group(cls=I2VGroup, context_settings=CONTEXT_SETTINGS)
def weights() -> None:
    """Download, convert and inspect weight files."""


@weights.command(context_settings=CONTEXT_SETTINGS)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The .safetensors file to write (never the input itself; through a symlink, the file it names; a pipe "
    "is written to as it is).",
)
def convert_cmd(model: Path, output: Path) -> None:
    """Convert a .caffemodel (Caffe V1 or V2 layers) or an earlier port's .pth into safetensors.

    \b
    Example:
      i2v weights convert illust2vec_tag_ver200.caffemodel -o illust2vec_tag_ver200.safetensors
    """
    from ..weights import convert
    from ..writers import check_output, display

    if str(output) == "-":  # stdout, as everywhere else (a terminal is refused by the writer)
        output = Path("/dev/stdout")
    check_output(str(output), [str(model)], writes=("safetensors",))
    info = convert(model, output)
    click.echo(
        f"{display(str(output))}: {info.kind} model, widths {'/'.join(map(str, info.widths))}"
        + (f", feature {info.feature_dim}" if info.feature_dim else "")
        + f", from {info.source} (sha256 {info.sha256[:12]}…)",
        err=True,
    )


convert_cmd.name = "convert"


@weights.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--dir",
    "dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to put the weights. Default: the per-user cache that i2v looks in.",
)
@click.option(
    "--only",
    type=click.Choice(["tag", "feature"]),
    multiple=True,
    help="Fetch only this model (repeatable). Default: both.",
)
@click.option(
    "--base-url",
    envvar="I2V_BASE_URL",
    default=RELEASE_BASE_URL,
    show_default=True,
    help="Where the release files are served ($I2V_BASE_URL): a mirror, or a file:// folder.",
)
@progress_option
def download(dest: Path | None, only: tuple[str, ...], base_url: str, progress: bool | None) -> None:
    """Fetch the original release's caffemodels, check them and convert them to safetensors.

    Files already in --dir are used without the network: a converted model is kept, and a caffemodel you put
    there (downloaded by hand) is converted and left in place. Downloads are checked against the release's
    SHA-256, from any --base-url too, and a partial one resumes where it stopped (if the server's file is still
    the same). The caffemodels are large (the feature model is about 1 GB); once converted, i2v finds them
    without --weights.

    \b
    Example:
      i2v weights download --only tag
    """
    dest = dest or default_weights_dir()

    def bar(name: str, total: int | None) -> Any:
        return byte_bar(total, progress, name)

    from ..download import fetch_release

    written = fetch_release(dest, base_url=base_url, which=only or ("tag", "feature"), progress_factory=bar)
    for path in written:
        click.echo(str(path))


@weights.command(context_settings=CONTEXT_SETTINGS)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def info(file: Path) -> None:
    """Print what a weight file holds (kind, widths, source and its SHA-256) as JSON."""
    from ..weights import load_weights

    _, meta = load_weights(file)
    click.echo(json.dumps(meta.as_dict(), indent=2))


def byte_bar(total: int | None, enabled: bool | None, name: str) -> Any:
    """A download bar on stderr in scaled binary units (``12.3M/245M [00:04, 55.1MB/s]``, not raw bytes), shown
    when asked for or when stderr is a terminal."""
    show = sys.stderr.isatty() if enabled is None else enabled
    from tqdm import tqdm

    return tqdm(
        total=total,
        disable=not show,
        file=sys.stderr,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=name,
        dynamic_ncols=True,
    )


from .calibrate import calibrate  # noqa: E402 (registered after the group is defined)

weights.add_command(calibrate)
