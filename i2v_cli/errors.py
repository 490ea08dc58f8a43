"""Typed errors of the library; the CLI turns each into a one-line message (no traceback)."""

from __future__ import annotations


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


class CalibrationError(I2VError):
    """A calibration set for ``--precision int8`` cannot be made or read (no usable image, not a calibration
    file, wrong shape)."""
