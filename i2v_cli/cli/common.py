"""What the CLI commands share: option decorators, the progress bar, signals, and turning library errors into
one-line messages with a documented exit status (see :data:`EXIT_STATUSES`)."""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click

from ..config import BACKENDS, PRECISIONS
from ..errors import I2VError, Interrupted, OutputError, WriteError

if TYPE_CHECKING:
    from ..ortcache import SessionNet

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_WRITE = 0, 1, 2, 3
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_SIGPIPE = 128 + signal.SIGPIPE
#: Every exit status i2v gives, as the README's table lists them.
EXIT_STATUSES = {
    EXIT_OK: "every input was processed",
    EXIT_SOME_FAILED: "some inputs failed (each named on stderr, each with an error record)",
    EXIT_USAGE: "usage error: a bad option, a missing input, no weights, an output that cannot be used",
    EXIT_WRITE: "an output could not be written midway (a full disk, an I/O error); the message names it",
    128 + signal.SIGHUP: "stopped by SIGHUP (a closed terminal); the work done is kept",
    EXIT_INTERRUPTED: "stopped by Ctrl-C (SIGINT); the work done is kept",
    EXIT_SIGPIPE: "the reader of stdout went away (`i2v tag dir | head`)",
    128 + signal.SIGTERM: "stopped by SIGTERM (timeout, Slurm, Kubernetes); the work done is kept",
}
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class FiniteRange(click.FloatRange):
    """A number in a range, and a number at all: click's FloatRange lets NaN through (every comparison with it is
    false, the range check's too), and an unbounded one infinity, which no option here means."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


#: A score or threshold: a number from 0 to 1.
SCORE = FiniteRange(0.0, 1.0)


class UsageFailure(click.ClickException):
    """A user's mistake reported in one line, exit status 2."""

    exit_code = EXIT_USAGE

    def format_message(self) -> str:
        return one_line(self.message)


class WriteFailure(UsageFailure):
    """An output that could not be written midway, exit status 3."""

    exit_code = EXIT_WRITE


def one_line(text: str) -> str:
    """:func:`i2v_cli.writers.one_line`, imported when first needed (it brings NumPy)."""
    from ..writers import one_line as _one_line

    return _one_line(text)


#: The signal that stopped the run, once one came (see I2VGroup.invoke).
_stopped_by: int | None = None


def _raise_interrupted(signum: int, _frame: object) -> None:
    # Once: a second signal during the clean-up that the first one started must not cut that clean-up short.
    global _stopped_by
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _stopped_by = signum
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP all stop the run the way Ctrl-C does: sinks keep the work done so far."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's ignored SIGHUP stays ignored
            signal.signal(sig, _raise_interrupted)


def show_warnings() -> None:
    """i2v's warnings (a backend not used as asked, ...) as one ``i2v: warning:`` line each on stderr, every time;
    other libraries' warnings as Python shows them."""
    import warnings

    from ..errors import I2VWarning

    default = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, I2VWarning):
            click.echo(f"i2v: warning: {one_line(str(message))}", err=True)
        else:
            default(message, category, *args, **kwargs)

    warnings.showwarning = show
    warnings.simplefilter("always", I2VWarning)


def exit_status(exc: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the run (130 for Ctrl-C)."""
    return 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)


def quiet_broken_pipe() -> None:
    """The reader of stdout went away: point stdout at /dev/null so nothing more (not even Python's last flush)
    complains."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


class I2VGroup(click.Group):
    """A group whose commands turn library errors into one-line messages and signals into 128 + signal."""

    def invoke(self, ctx: click.Context) -> Any:
        global _stopped_by
        _stopped_by = None  # this run's signal only (the CLI may be invoked again in one process, as tests do)
        try:
            try:
                return super().invoke(ctx)
            except (I2VError, click.ClickException, OSError) as exc:
                # The interruption raised inside a library's native code (the safetensors reader while weights
                # load) came out as that library's own error ("not a valid safetensors file", exit 2): the signal
                # came first, so the run was interrupted.
                if _stopped_by is not None:
                    raise Interrupted(_stopped_by) from exc
                raise
        except WriteError as exc:
            raise WriteFailure(str(exc)) from None
        except I2VError as exc:
            raise UsageFailure(str(exc)) from None
        except BrokenPipeError:
            quiet_broken_pipe()
            ctx.exit(EXIT_SIGPIPE)
        except KeyboardInterrupt as exc:
            what = {signal.SIGTERM: "terminated (SIGTERM)", signal.SIGHUP: "hung up (SIGHUP)"}
            click.echo(f"i2v: {what.get(getattr(exc, 'signum', 0), 'interrupted')}", err=True)
            ctx.exit(exit_status(exc))


class SectionedCommand(click.Command):
    """A command whose ``-h`` lists its options in named sections (``sections``: title -> parameter names), the
    rest under "Options", so that a long list (captions, Ray) reads as groups."""

    def __init__(self, *args: Any, sections: dict[str, tuple[str, ...]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sections = sections or {}

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        placed = {name for names in self.sections.values() for name in names}
        groups: dict[str, list[tuple[str, str]]] = {"Options": []}
        for title in self.sections:
            groups[title] = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            title = next((t for t, names in self.sections.items() if param.name in names), "Options")
            groups["Options" if param.name not in placed else title].append(record)
        for title, records in groups.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


MODEL_SECTION = ("weights", "device", "batch_size", "workers", "decode", "precision", "backend")
RAY_SECTION = ("engine", "ray_address", "num_workers", "gpus_per_worker", "shard_size", "ray_transfer")


def default_workers(model: Any = None) -> int:
    """Decoding workers by default: one per core, at most 4, where the network shares the CPU with them; every core
    but one when ``model`` (a torch network, or None) is on a GPU, which 4 workers could not keep busy (measured
    on a 16-core H100 machine: decoding bounded the run)."""
    cores = _usable_cores()
    if model is not None:
        from ..inference import model_device

        if model_device(model).type == "cuda":
            return max(1, cores - 1)
    return max(1, min(4, cores))


def _usable_cores() -> int:
    """The cores this process may run on (its affinity on Linux), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_decode(decode: str, model: Any) -> None:
    """Refuse ``--decode cuda`` where it cannot run (an I2VError in one line), before anything is written.
    ``model``: the loaded torch network, or None (a CPU session)."""
    if decode == "cpu":
        return
    import torch

    from ..gpudecode import check_gpu_decoding
    from ..inference import model_device

    check_gpu_decoding(decode, model_device(model) if model is not None else torch.device("cpu"))


def default_threads() -> int:
    """The intra-op threads torch will use by default, guessed without importing it: ``$OMP_NUM_THREADS``, else
    the cores this process may run on. A guess that turns out wrong only costs the early session (see
    :func:`recall_while_importing`)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return _usable_cores()


def _surely_cpu(device: str) -> bool:
    """Whether ``--device`` will resolve to the CPU, known without torch: ``cpu``, or ``auto`` on a Linux system
    with no GPU device node (CUDA and ROCm need theirs)."""
    if device == "cpu":
        return True
    gpu_nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
    return device == "auto" and sys.platform.startswith("linux") and not any(map(os.path.exists, gpu_nodes))


def _import_network_modules() -> None:
    """Import what runs a network (torch comes with it), in a thread beside the session being opened."""
    import contextlib

    with contextlib.suppress(ImportError):  # raised again, with its message, where the main thread imports them
        from .. import data, inference, weights  # noqa: F401


def recall_while_importing(
    weights: os.PathLike[str], device: str, backend: str, precision: str
) -> tuple[int, Any, Any, dict[str, Any]] | None:
    """When the run will be fp32 in ONNX Runtime on the CPU and an earlier run recorded the export of ``weights``
    (:func:`i2v_cli.ortcache.recall_export`): ``(threads, session, export, info)``, the session opened while
    torch is imported in a thread beside it (it releases the GIL for most of its work). Else None, after the same
    import. The caller checks the guesses (device, threads) once torch is there."""
    import importlib.util
    import threading

    if precision != "fp32" or backend not in ("auto", "onnxruntime") or not _surely_cpu(device):
        return None
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    from ..ortcache import recall_export

    importer = threading.Thread(target=_import_network_modules, name="i2v-import", daemon=True)
    importer.start()
    try:
        threads = default_threads()
        found = recall_export(Path(weights), threads)
    finally:
        importer.join()
    return None if found is None else (threads, *found)


def runs_without_torch(
    device: str, backend: str, precision: str, workers: int | None, images: int, batch_size: int
) -> bool:
    """Whether a tag run may go without torch, should its weights' export be known (:func:`recall_session`):
    fp32 in ONNX Runtime on the CPU (what ``--backend auto`` picks there when the ``onnx`` extra is installed) and
    at most one batch of images, with ``--workers`` not given (the batch is decoded in one child process, as a
    DataLoader worker would: :func:`i2v_cli.batches.read_batches`) or 0 (in this process). One batch leaves a
    reader thread or several workers nothing to overlap. The rest takes the torch path, as does a run whose
    export is not known yet (the weights must be read and exported)."""
    import importlib.util

    if precision != "fp32" or backend not in ("auto", "onnxruntime") or not _surely_cpu(device):
        return False
    if workers not in (None, 0) or not 0 < images <= batch_size:
        return False
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    return backend == "onnxruntime" or importlib.util.find_spec("onnx") is not None  # as resolve_backend's auto


def recall_session(weights: os.PathLike[str]) -> tuple[SessionNet, dict[str, Any]] | None:
    """A :class:`~i2v_cli.ortcache.SessionNet` on the export an earlier run recorded for ``weights``
    (:func:`i2v_cli.ortcache.recall_export`), with :func:`default_threads` threads, and the weights' info; None
    when there is no usable record. torch is not imported."""
    from ..ortcache import SessionNet, recall_export

    found = recall_export(Path(weights), default_threads())
    if found is None:
        return None
    session, export, info = found
    return SessionNet(session, export), info


def _apply(f: F, options: list[Callable[[F], F]]) -> F:
    """``f`` decorated with ``options``, the first shown first in ``--help``."""
    for option in reversed(options):
        f = option(f)
    return f


def run_options(net: str = "network", batch_help: str = "Images per network call.") -> Callable[[F], F]:
    """--device, --batch-size, --workers, --decode, --precision and --backend: how ``net`` ("network", or "networks"
    for ``index``) runs; one definition for every command that runs one."""
    options = [
        click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                     help=f"Where the {net} runs." if net == "network" else f"Where the {net} run."),
        click.option("--batch-size", "-b", type=click.IntRange(1), default=16, show_default=True, help=batch_help),
        click.option("--workers", "-j", type=click.IntRange(0), default=None,
                     help="Processes decoding images (0: in the main process). "
                          "Default: cores, at most 4 (on a GPU: all cores but one)."),
        click.option("--decode", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="Where JPEG files are decoded and resized. cpu gives the reference inputs; cuda (with "
                          "--device cuda and torchvision) decodes them with nvJPEG on the GPU: several times faster "
                          "where the CPU bounds a GPU run, with scores moved a little (nvJPEG is not libjpeg). Other "
                          "files, and JPEGs it should not take, are decoded on the CPU."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                     help=f"Arithmetic of the {net}. fp32 gives the reference scores (IEEE, also on CUDA); tf32 "
                          "(CUDA), bf16 (CPU or CUDA) and fp16 (CUDA) are faster and move scores by about 1e-2; int8 "
                          "(CPU only, ONNX Runtime) is faster still, with about 1% of decisions at 0.5 changed."),
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                     help=f"What runs the {net}. auto: ONNX Runtime for fp32 on a CPU when installed "
                          "(pip install onnx onnxruntime), else PyTorch."),
    ]  # fmt: skip
    return lambda f: _apply(f, options)


def model_options(f: F) -> F:
    """--weights and :func:`run_options`: which network to run, and how."""
    weights = click.option(
        "--weights",
        "-w",
        metavar="FILE",
        help="Weight file (.safetensors, .caffemodel or .pth). "
        "Default: $I2V_WEIGHTS, then the cache filled by `i2v weights download`.",
    )
    return weights(run_options()(f))


def stdin_for(paths: Sequence[str]) -> IO[bytes] | None:
    """Standard input's bytes when ``-`` is among ``paths`` (paths are read from it), else None; a usage error when
    standard input is closed (``<&-``), where Python has no ``sys.stdin`` at all."""
    if "-" not in paths:
        return None
    if sys.stdin is None:
        raise UsageFailure("'-' reads paths from standard input, which is closed: pipe the paths in, or give them")
    return sys.stdin.buffer


def paths_options(required: bool = True) -> Callable[[F], F]:
    """PATH... arguments with --recursive and -0: what to process (``required=False`` where another option, such
    as ``index --import``, can stand for them)."""
    options = [
        click.argument("paths", nargs=-1, required=required, metavar="PATH..."),
        click.option("--recursive", "-r", is_flag=True, help="Look for images in sub-folders too."),
        click.option(
            "--null",
            "-0",
            "nul",
            is_flag=True,
            help="Paths read from '-' are NUL-separated (as `find -print0` writes).",
        ),
    ]
    return lambda f: _apply(f, options)


#: PATH... (required), --recursive and -0.
input_options = paths_options()


def progress_option(f: F) -> F:
    """--progress/--no-progress: the bar shows on a terminal's stderr by default, never on stdout."""
    return click.option(
        "--progress/--no-progress",
        default=None,
        help="Show a progress bar on stderr (default: when stderr is a terminal).",
    )(f)


def progress_bar(total: int | None, enabled: bool | None, unit: str = "img", desc: str | None = None) -> Any:
    """A tqdm bar on stderr, shown when asked for or when stderr is a terminal."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, disable=not show, file=sys.stderr, unit=unit, desc=desc, dynamic_ncols=True)


def echo(bar: Any, line: str) -> None:
    """One line on stderr, kept clear of the progress bar."""
    if bar is None or bar.disable:
        click.echo(line, err=True)
    else:
        bar.write(line, file=sys.stderr)


def report_failure(bar: Any, path: str, error: str) -> None:
    """One line on stderr for an input that failed (newlines in a name escaped, so it stays one line)."""
    shown, error = one_line(path), one_line(error)
    # Decoding errors name their file already; others get it in front.
    echo(bar, f"i2v: {error}" if error.startswith(shown) else f"i2v: {shown}: {error}")


def report_batch(bar: Any, records: list[dict[str, Any]]) -> None:
    """After each batch: advance the progress bar and name each input that failed on stderr."""
    bar.update(len(records))
    for record in records:
        if "error" in record:
            report_failure(bar, record["path"], record["error"])


def usage(exc: OutputError | I2VError) -> UsageFailure:
    """A library error found while checking options, as the CLI's one-line usage failure."""
    return UsageFailure(str(exc))
