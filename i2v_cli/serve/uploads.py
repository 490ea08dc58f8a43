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
import shutil
import tempfile
import uuid
from collections.abc import Callable
from typing import TypeVar

import torch
from PIL import Image

from ..decode import PATH_LIST_HINT, open_image
from ..errors import ImageDecodeError
from ..transform import load_and_preprocess
from ..writers import one_line

T = TypeVar("T")


def upload_name(filename: str | None, position: int) -> str:
    """The name an upload's record carries: the client's file name as sent, or ``upload-N`` when it sent none."""
    return filename if filename else f"upload-{position}"


class UploadDecoder:
    """Decodes uploads through files in a private folder (mode 0700) that it removes when closed."""

    def __init__(self, folder: str | None = None) -> None:
        self.folder = tempfile.mkdtemp(prefix="i2v-serve-", dir=folder)

    def decode(self, data: bytes, name: str) -> torch.Tensor:
        """The (3, 224, 224) network input of an upload's bytes; ImageDecodeError naming ``name`` when it is bad."""
        return self._through_file(data, name, load_and_preprocess)

    def open_image(self, data: bytes, name: str) -> Image.Image:
        """The decoded, upright image of ``data`` (:func:`i2v_cli.decode.open_image`'s checks), for bytes already
        read and checked, never a path opened again; ImageDecodeError naming ``name`` when it is bad."""
        return self._through_file(data, name, open_image)

    def _through_file(self, data: bytes, name: str, read: Callable[[str], T]) -> T:
        """``read`` of a private temporary file holding ``data``; its errors name ``name``, with no CLI advice."""
        path = os.path.join(self.folder, uuid.uuid4().hex)
        try:
            with open(path, "wb") as f:
                f.write(data)
            return read(path)
        except ImageDecodeError as exc:
            text = str(exc)
            if text.startswith(path):
                text = one_line(name) + text[len(path) :]
            raise ImageDecodeError(text.replace(PATH_LIST_HINT, "")) from None  # CLI advice: no use over HTTP
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def close(self) -> None:
        """Remove the folder and whatever a killed decode left in it."""
        with contextlib.suppress(FileNotFoundError):  # already gone: discard() removed it
            for entry in os.listdir(self.folder):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.folder, entry))
            os.rmdir(self.folder)

    def discard(self) -> None:
        """Remove the folder at once, whatever decodes are still under way (a forced exit: nothing waits for them)."""
        shutil.rmtree(self.folder, ignore_errors=True)
