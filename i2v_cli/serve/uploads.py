"""Uploaded images to network inputs, with exactly the checks of ``i2v tag``.

An upload is written to a private temporary file and decoded by :func:`i2v_cli.transform.load_and_preprocess`,
the same function the CLI's reader uses: the content is sniffed (the client's file name and content type are never
trusted), empty and truncated files, text and unknown formats are refused in words, and the pixel limit
(``PIL.Image.MAX_IMAGE_PIXELS``, the decompression-bomb check) holds before any pixel is decoded. Messages name
the upload by the client's file name, never by the temporary file. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid

import torch

from ..errors import ImageDecodeError
from ..transform import load_and_preprocess
from ..writers import one_line


def upload_name(filename: str | None, position: int) -> str:
    """The name an upload's record carries: the client's file name as sent, or ``upload-N`` when it sent none."""
    return filename if filename else f"upload-{position}"


class UploadDecoder:
    """Decodes uploads through files in a private folder (mode 0700) that it removes when closed."""

    def __init__(self, folder: str | None = None) -> None:
        self.folder = tempfile.mkdtemp(prefix="i2v-serve-", dir=folder)

    def decode(self, data: bytes, name: str) -> torch.Tensor:
        """The (3, 224, 224) network input of an upload's bytes; ImageDecodeError naming ``name`` when it is bad."""
        path = os.path.join(self.folder, uuid.uuid4().hex)
        try:
            with open(path, "wb") as f:
                f.write(data)
            return load_and_preprocess(path)
        except ImageDecodeError as exc:
            text = str(exc)
            if text.startswith(path):
                text = one_line(name) + text[len(path) :]
            raise ImageDecodeError(text) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def close(self) -> None:
        """Remove the folder and whatever a killed decode left in it."""
        for entry in os.listdir(self.folder):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.folder, entry))
        os.rmdir(self.folder)
