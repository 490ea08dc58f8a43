"""What the server does, without HTTP: the models loaded once, decoding in a thread pool, the network behind the
batcher, records made by the pipeline's record stage, and read-only access to an index. Nothing here prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import sqlite3
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import decode_error
from ..errors import I2VError, ImageDecodeError
from ..inference import Predictor, describe
from ..pipeline import FeatureRecords, TagRecords
from ..runner import Result
from ..store import how_weights_differ, model_identity, same_weights
from ..tags import Selection
from ..writers import Record
from .batcher import Batcher
from .uploads import UploadDecoder

#: Side of the thumbnails of ``/v1/images/{id}/thumb`` (the longer side, in pixels).
THUMB_SIZE = 256
#: Thumbnails kept in memory.
THUMB_CACHE = 1024


class NotFound(I2VError):
    """An image id the index does not hold, or whose file is no longer the one indexed."""


class Busy(I2VError):
    """The index did not answer within the request timeout (a costly query, or others before it): try again."""


@dataclass(frozen=True)
class Settings:
    """How the server runs: batching, decoding threads and the limits on what a client may send."""

    max_batch: int = 16
    max_wait_ms: float = 5.0
    decode_threads: int = 2
    max_upload_bytes: int = 32 * 1024 * 1024
    max_files: int = 64
    request_timeout_s: float = 60.0


class Service:
    """The tag and feature networks (either may be None), their batcher and decoder, and an optional index."""

    def __init__(
        self,
        nets: dict[str, Predictor],
        device: torch.device,
        tags: Sequence[str],
        settings: Settings,
        index: Any | None = None,
    ) -> None:
        self.nets = nets
        self.tags = list(tags)
        self.settings = settings
        self.batcher = Batcher(nets, device, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms)
        self.decoder = UploadDecoder()
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="i2v-decode")
        self.index = IndexReader(index, self.decoder, settings.request_timeout_s) if index is not None else None
        self._abandoned = False

    def close(self) -> None:
        """Finish what is queued, then let the threads and the temporary folder go (nothing, once abandoned)."""
        if self._abandoned:
            return
        self.batcher.close()
        self.pool.shutdown(wait=True)
        self.decoder.close()
        if self.index is not None:
            self.index.close()

    def abandon(self) -> None:
        """A forced exit (a second SIGTERM or Ctrl-C): the temporary folder goes now, and :meth:`close` then waits
        for nothing, neither the queued images nor the decodes under way; the process is about to end."""
        self._abandoned = True
        self.decoder.discard()

    def health(self) -> dict[str, Any]:
        """What /healthz reports: the models and what runs them, the index, the batches run so far."""
        stats = self.batcher.stats
        return {
            "status": "ok" if self.batcher.alive else "stopped",
            "models": {name: describe(net) for name, net in self.nets.items()},
            "index": None if self.index is None else self.index.summary(),
            "batches": {"run": stats.batches, "images": stats.images, "largest": stats.largest},
            "limits": {
                "max_batch": self.settings.max_batch,
                "max_wait_ms": self.settings.max_wait_ms,
                "max_upload_bytes": self.settings.max_upload_bytes,
                "max_files": self.settings.max_files,
                "request_timeout_s": self.settings.request_timeout_s,
            },
        }

    def _decode(self, data: bytes, name: str) -> torch.Tensor:
        try:
            return self.decoder.decode(data, name)
        except ImageDecodeError:
            raise
        except Exception as exc:  # as in the CLI's reader: any failure of one image is that image's record
            raise ImageDecodeError(decode_error(name, exc)) from None

    async def run(self, model: str, uploads: Sequence[tuple[str, bytes]]) -> list[Result]:
        """Each upload (name, bytes) decoded in the pool and run through ``model``'s network by the batcher; one
        :class:`~i2v_cli.runner.Result` per upload, in order (an image that cannot be decoded has its error)."""
        if model not in self.nets:
            raise KeyError(model)
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(self.pool, self._decode, data, name) for name, data in uploads),
            return_exceptions=True,
        )
        results: list[Result | None] = [None] * len(uploads)
        ok = []
        for i, ((name, _), item) in enumerate(zip(uploads, decoded, strict=True)):
            if isinstance(item, ImageDecodeError):
                results[i] = Result(name, None, str(item))
            elif isinstance(item, BaseException):
                raise item
            else:
                ok.append(i)
        if ok:
            futures = self.batcher.submit(model, [uploads[i][0] for i in ok], [decoded[i] for i in ok])  # type: ignore[misc]
            for i, result in zip(ok, await asyncio.gather(*map(asyncio.wrap_future, futures)), strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    def tag_records(self, results: Sequence[Result], selection: Selection) -> list[Record]:
        """The records of ``i2v tag`` for these results (the pipeline's record stage)."""
        return TagRecords(self.tags, selection)(results)

    @staticmethod
    def feature_records(results: Sequence[Result], binary: bool) -> list[Record]:
        """The records of ``i2v features`` for these results."""
        return FeatureRecords(binary)(results)


class IndexReader:
    """Read-only access to an index for the API: searches and the files of indexed images, by row id only.
    ``decoder`` decodes the bytes of a file read for a thumbnail (a new one is made when none is given)."""

    def __init__(self, index: Any, decoder: UploadDecoder | None = None, timeout_s: float | None = None) -> None:
        self.index = index
        self._own_decoder = decoder is None
        self.decoder = decoder if decoder is not None else UploadDecoder()
        #: The connection is one: a request waits its turn, at most ``timeout_s``, and runs at most that long.
        self.lock = threading.Lock()
        self.timeout_s = timeout_s
        self._thumbs: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self._summary: dict[str, Any] | None = None

    def close(self) -> None:
        self.index.close()
        if self._own_decoder:
            self.decoder.close()

    @contextlib.contextmanager
    def _turn(self, wait_s: float | None = None) -> Iterator[None]:
        """The connection for one request: waited for at most ``wait_s`` (default the timeout), and its SQL stopped
        once the timeout has passed (Busy), so that one costly query does not hold every other request (each page,
        each /healthz) behind it for as long as it runs."""
        timeout = self.timeout_s
        wait = timeout if wait_s is None else wait_s
        if not self.lock.acquire(timeout=-1 if wait is None else wait):
            raise Busy(f"the index is busy with other requests: try again (waited {wait:g} s)")
        try:
            if timeout is None:
                yield
                return
            deadline = time.monotonic() + timeout
            self.index.conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
            try:
                yield
            except sqlite3.OperationalError as exc:
                if "interrupted" not in str(exc):
                    raise
                raise Busy(f"the query took over {timeout:g} s: try a narrower one") from None
            finally:
                self.index.conn.set_progress_handler(None, 0)
        finally:
            self.lock.release()

    def summary(self) -> dict[str, Any]:
        """The index's size, for /healthz: the last one known while a long request holds the index (a health check
        must answer at once)."""
        try:
            with self._turn(wait_s=0.5):
                self._summary = {"images": self.index.count(), "feature_dim": self.index.feature_dim}
        except Busy:
            if self._summary is None:
                return {"images": None, "feature_dim": self.index.feature_dim, "busy": True}
            return {**self._summary, "busy": True}
        return self._summary

    def search(
        self, query: str, *, threshold: float = 0.5, like: int | np.ndarray | None = None, k: int | None = None
    ) -> list[dict[str, Any]]:
        """Hits of ``i2v search``: the booru query, and ``like`` (a row id or a feature) ranking by cosine."""
        from ..query import parse, search
        from ..writers import path_fields

        terms = parse(query, self.index.tags, threshold)
        with self._turn():
            exclude = None
            if isinstance(like, int):
                feature = self.index.feature(like)
                if feature is None:
                    raise NotFound(f"no indexed image {like} with a feature")
                exclude, like = like, feature
            hits = search(self.index, terms, like=like, exclude=exclude, k=k)
        return [
            {"id": h.row, **path_fields("path", h.path), **({} if h.score is None else {"score": h.score})}
            for h in hits
        ]

    def row(self, image: int) -> dict[str, Any]:
        """An indexed image's stored facts (no scores); NotFound for an id the index does not hold."""
        with self._turn():
            found = self.index.conn.execute(
                "SELECT path, size, mtime_ns, sha256, width, height, format, error, rating FROM images WHERE id = ?",
                (image,),
            ).fetchone()
        if found is None:
            raise NotFound(f"no indexed image {image}")
        keys = ("path", "size", "mtime_ns", "sha256", "width", "height", "format", "error", "rating")
        row = dict(zip(keys, found, strict=True))
        from ..index import stored_name

        row["path"] = stored_name(row["path"])
        return row

    def info(self, image: int, selection: Selection, tags: Sequence[str]) -> Record:
        """An indexed image's record as ``i2v tag`` would write it (tags by ``selection``), with its id and size."""
        from ..tags import tag_record

        row = self.row(image)
        with self._turn():
            scores = self.index.scores(image)
        record = tag_record(row["path"], scores, row["error"], tags, selection)
        return {"id": image, **record, "width": row["width"], "height": row["height"], "format": row["format"]}

    def open_file(self, image: int) -> tuple[bytes, str | None]:
        """The bytes of an indexed image's file, and its format. The path comes from the index, never from a
        request; the file must have been indexed as an image (a file that failed, a text file named .png say, is
        NotFound: its hash is stored too), must still be a regular file of the indexed size and mtime (else
        NotFound, before it is read), and its bytes must be the indexed ones: their SHA-256 is the index's.

        The hash is what makes this safe: size and mtime are the target's when a symlink (at the file's name or
        at a folder on its path) was put in its place, and whoever can write to the indexed folders can give a
        file any size and mtime. Symlinks are followed, not refused, because ``i2v index`` indexes a symlink to
        an image, and a path through a symlinked folder, under the link's name: those files stay served."""
        row = self.row(image)
        if row["error"] is not None:  # not an image (a text file named .png, a link to one): never served
            raise NotFound(f"indexed image {image} could not be indexed ({row['error']}): it is not served")
        changed = f"the file of indexed image {image} changed since it was indexed: run `i2v index` again"
        try:
            fd = os.open(row["path"], os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            raise NotFound(f"the file of indexed image {image} cannot be read") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size != row["size"] or st.st_mtime_ns != row["mtime_ns"]:
                raise NotFound(changed)
            try:
                data = f.read(row["size"] + 1)  # one byte more: a file grown since the fstat is not the indexed one
            except OSError:
                raise NotFound(f"the file of indexed image {image} cannot be read") from None
        if hashlib.sha256(data).digest() != bytes(row["sha256"]):
            raise NotFound(changed)
        return data, row["format"]

    def thumbnail(self, image: int) -> bytes:
        """A JPEG of at most THUMB_SIZE pixels a side of an indexed image (decoded with the CLI's checks, from the
        bytes :meth:`open_file` read and checked: the path is not opened a second time, when it might lead
        elsewhere)."""
        from PIL import Image

        from ..decode import image_to_array

        row = self.row(image)
        key = (image, row["mtime_ns"])
        with self._thumbs_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        data, _ = self.open_file(image)  # the same checks as the full image
        try:
            img = Image.fromarray(image_to_array(self.decoder.open_image(data, row["path"])))
        except ImageDecodeError as exc:
            raise NotFound(f"indexed image {image} cannot be decoded now: {exc}") from None
        img.thumbnail((THUMB_SIZE, THUMB_SIZE))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        with self._thumbs_lock:
            self._thumbs[key] = buf.getvalue()
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return buf.getvalue()


def load_service(
    tag_weights: str | None,
    feature_weights: str | None,
    *,
    db: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    backend: str = "auto",
    settings: Settings | None = None,
) -> Service:
    """Both models loaded once (``--tag-weights``/``--feature-weights``, else ``$I2V_WEIGHTS``, else the cache, as
    ``i2v index`` finds them) and the index ``db`` opened read-only; its feature model must be the one served."""

    from ..config import FEATURE, TAG
    from ..index import Index, IndexDbError
    from ..inference import prepare_for_inference, resolve_backend
    from ..runner import resolve_device
    from ..tags import load_tag_list
    from ..weights import load_model, resolve_weights

    dev = resolve_device(device)
    resolve_backend(backend, dev, precision)
    tag_model, _ = load_model(resolve_weights(tag_weights, TAG, "--tag-weights"), kind=TAG, device=str(dev))
    feature_model, feature_info = load_model(
        resolve_weights(feature_weights, FEATURE, "--feature-weights"), kind=FEATURE, device=str(dev)
    )
    index = None
    if db is not None:
        index = Index(db, readonly=True)
        stored = index.model_record("feature_model")
        if stored.get("sha256") is not None and not same_weights(stored, model_identity(feature_info)):
            index.close()
            raise IndexDbError(
                f"--feature-weights {feature_info.source} is not the feature model {db} was indexed with "
                f"({stored.get('source')}; {how_weights_differ(stored, model_identity(feature_info))}): similarity "
                "would mean nothing"
            )
    nets = {
        "tag": prepare_for_inference(tag_model, precision=precision, backend=backend),
        "feature": prepare_for_inference(feature_model, precision=precision, backend=backend),
    }
    return Service(nets, dev, load_tag_list(), settings or Settings(), index)
