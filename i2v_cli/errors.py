"""Typed errors of the library; the CLI turns each into a one-line message (no traceback)."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message for a one-line error or note: its first line, cut to ``limit`` characters (a
    library's message can be a page long), or the exception's class name when it has none."""
    text = str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class I2VError(Exception):
    """Base class of every error i2v raises on purpose: a user's mistake or a bad file, not a bug."""


class WeightsError(I2VError):
    """A weight file cannot be read, or does not hold the layers and shapes of an Illustration2Vec model."""


class WeightsNotFoundError(WeightsError):
    """No weight file was given and none was found in the default places."""


class ModelKindError(WeightsError):
    """A feature model was given where a tag model is needed, or the reverse."""


class TagListError(I2VError):
    """The tag list is not a JSON list of 1,539 strings."""


class InputError(I2VError):
    """The inputs named on the command line cannot be found or used (no images, bad glob, ...)."""


class DownloadError(I2VError):
    """A release file could not be fetched."""


class ImageDecodeError(I2VError):
    """An image file cannot be read or decoded; the message says why (empty, truncated, not an image, ...)."""


class CaptionError(I2VError):
    """Caption options that cannot work, images that would share a caption file, or a caption file that
    cannot be read or written."""


class OutputError(I2VError):
    """An output cannot be written (full disk, no permission, a folder where a file is needed), or the
    command would destroy something it must not (an input, a foreign file, another run's output)."""


class WriteError(OutputError):
    """Writing an output failed midway (a full disk, an I/O error): the message names the file and the reason."""


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop: Ctrl-C (SIGINT), SIGTERM (``timeout``, Slurm, Kubernetes) or SIGHUP (a closed
    terminal). A KeyboardInterrupt, so every sink keeps the work done so far, as it does for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class I2VWarning(UserWarning):
    """Something a user should know that did not stop the work; the CLI prints each as one line on stderr."""


class BackendWarning(I2VWarning):
    """The inference backend asked for (or chosen by ``auto``) was not used as asked: its ONNX cache entry was
    unusable and rebuilt, or it could not run and another backend computed the outputs instead."""


class ServerUnreachableError(DownloadError):
    """No answer from the server at all (no network, a name that does not resolve, a refused connection)."""


class ImageArrayError(I2VError, ValueError):
    """An array or tensor given as an image has a shape, type or value range that i2v does not take as
    pixels; the message says what to pass. A ValueError too, as such mistakes were before."""


class ParameterError(I2VError, ValueError):
    """An argument of a library call that cannot work (a negative ``n_tag``, a threshold outside [0, 1] or NaN,
    a batch size below 1, an unknown backend or precision): a ValueError too, as Python callers expect."""


class ImageInputError(I2VError, ValueError):
    """An image given to the Python API that cannot be used: not a PIL image, an array or a path, an array that
    is not an image's shape, or a file that cannot be decoded. ``index`` is its position in the list given
    (None for a single image) and ``path`` its path when it was given as one; the cause is chained."""

    def __init__(self, message: str, *, index: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.path = path


class UnknownTagError(I2VError, KeyError):
    """Tag names asked for that are not in the tag list (a KeyError too, as the earlier API raised)."""

    def __str__(self) -> str:  # KeyError's own would quote the whole message
        return str(self.args[0]) if self.args else ""


class CalibrationError(I2VError):
    """A calibration set for ``--precision int8`` cannot be made or read (no usable image, not a calibration
    file, wrong shape)."""
