"""Sidecar files beside the images of an index: XMP keywords (``IMAGE.xmp``: exiftool, digiKam, darktable read
``dc:subject``) and Hydrus import-folder tags (``IMAGE.txt``: a tag a line, ``character:``, ``series:`` and
``rating:`` namespaces).

Existing sidecars are merged, never clobbered: the tags already there stay, in their order, and the new ones
are appended (a union; i2v never removes a tag, so a tag a person added, or one from an earlier export at
another threshold, stays). In an XMP file everything else (other properties, other namespaces) is kept. A
sidecar that cannot be parsed is left as it is and reported. Every sidecar is written through
:mod:`i2v_cli.atomic`. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .atomic import write_bytes
from .config import NUM_TAGS
from .errors import I2VError, OutputError, WriteError
from .index import Index, stored, stored_name
from .store import file_identity
from .tags import Selection, select_tags
from .writers import display

SIDECAR_KINDS = ("xmp", "hydrus")
#: Hydrus namespaces of the categories (general tags have none).
HYDRUS_NAMESPACES = {"general": "", "character": "character:", "copyright": "series:", "rating": "rating:"}
_NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
}
for _prefix, _uri in _NS.items():
    ET.register_namespace(_prefix, _uri)
_PACKET_BEGIN = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
_PACKET_END = '\n<?xpacket end="w"?>\n'


class SidecarError(I2VError):
    """A sidecar that exists but cannot be read or merged (not XML, not XMP, not UTF-8)."""


def sidecar_path(image: str, kind: str) -> str:
    """``IMAGE.xmp`` or ``IMAGE.txt`` (the image's full name plus the suffix, as darktable and Hydrus expect)."""
    return image + (".xmp" if kind == "xmp" else ".txt")


def image_tags(scores: np.ndarray, tags: Sequence[str], selection: Selection) -> list[str]:
    """The keywords of one image, for both kinds: the selected tags, highest score first per category, in the
    Hydrus namespaces (``character:``, ``series:``, none for general tags), then ``rating:`` the top rating."""
    selected = select_tags(scores, tags, selection)
    rating = max(selected["rating"], key=selected["rating"].__getitem__)
    out = []
    for category in ("character", "copyright", "general"):
        out.extend(HYDRUS_NAMESPACES[category] + t for t in selected[category])
    out.append("rating:" + rating)
    return out


def merge_hydrus(existing: str | None, new: Sequence[str]) -> str:
    """A Hydrus tag file: the existing lines (order kept), then the new tags not already there."""
    # Lines end at \n (and \r\n) only: str.splitlines also cut a tag at \u2028, \x0b or \x1c.
    lines = [] if existing is None else [line.strip() for line in existing.split("\n") if line.strip()]
    have = set(lines)
    lines.extend(t for t in new if t not in have and not have.add(t))  # type: ignore[func-returns-value]
    windows = existing is not None and existing.count("\n") == existing.count("\r\n") > 0
    end = "\r\n" if windows else "\n"  # the file's own line ends, when they are all Windows'
    return "".join(line + end for line in lines)


def merge_xmp(existing: str | None, new: Sequence[str], name: str = "sidecar") -> str:
    """An XMP packet whose ``dc:subject`` bag holds its keywords, then the new ones not already there; every
    other element of an existing packet is kept."""
    prefixes: dict[str, str] = {}
    if existing is None or not existing.strip():
        root = ET.Element(f"{{{_NS['x']}}}xmpmeta")
    else:
        try:
            root, prefixes = _parse(existing.encode("utf-8"))
        except ET.ParseError as exc:
            raise SidecarError(f"{name}: not XML ({exc}); left as it is") from None
    rdf = root if root.tag == f"{{{_NS['rdf']}}}RDF" else root.find(f"{{{_NS['rdf']}}}RDF")
    if rdf is None:
        if root.tag != f"{{{_NS['x']}}}xmpmeta":
            raise SidecarError(f"{name}: not an XMP packet (its root is {root.tag}); left as it is")
        rdf = ET.SubElement(root, f"{{{_NS['rdf']}}}RDF")
    subject = rdf.find(f"{{{_NS['rdf']}}}Description/{{{_NS['dc']}}}subject")
    if subject is None:
        description = rdf.find(f"{{{_NS['rdf']}}}Description")
        if description is None:
            description = ET.SubElement(rdf, f"{{{_NS['rdf']}}}Description", {f"{{{_NS['rdf']}}}about": ""})
        subject = ET.SubElement(description, f"{{{_NS['dc']}}}subject")
    # XMP makes dc:subject a Bag; a Seq or Alt that another program wrote there is the list to extend (a second
    # array beside it hid the user's keywords from exiftool).
    arrays = (subject.find(f"{{{_NS['rdf']}}}{kind}") for kind in ("Bag", "Seq", "Alt"))
    bag = next((a for a in arrays if a is not None), None)
    if bag is None:
        bag = ET.SubElement(subject, f"{{{_NS['rdf']}}}Bag")
    have = {li.text or "" for li in bag.findall(f"{{{_NS['rdf']}}}li")}
    added = 0
    for keyword in new:
        if keyword not in have:
            have.add(keyword)
            ET.SubElement(bag, f"{{{_NS['rdf']}}}li").text = keyword
            added += 1
    if not added and existing is not None and existing.strip():
        return existing  # nothing to add: the file is left byte for byte (its comments, its prefixes)
    ET.indent(root, space=" ")
    return _PACKET_BEGIN + _serialize(root, prefixes) + _PACKET_END


def _parse(data: bytes) -> tuple[ET.Element, dict[str, str]]:
    """An XMP packet's tree, its comments and processing instructions kept, and the prefixes it gives its namespaces
    (uri -> prefix): ElementTree drops both, so a merged sidecar lost its comments and had ``xmp:Rating`` renamed
    ``ns2:Rating``."""
    root = ET.fromstring(data, ET.XMLParser(target=ET.TreeBuilder(insert_comments=True, insert_pis=True)))
    prefixes: dict[str, str] = {}
    for _, (prefix, uri) in ET.iterparse(io.BytesIO(data), events=("start-ns",)):
        if prefix:
            prefixes.setdefault(uri, prefix)
    return root, prefixes


_SERIALIZE = threading.Lock()


def _serialize(root: ET.Element, prefixes: dict[str, str]) -> str:
    """``root`` as text, each namespace under the packet's own prefix (ElementTree knows prefixes only through its
    global registry: registered for this call, under a lock, then put back)."""
    with _SERIALIZE:
        registry = getattr(ET, "_namespace_map", {})  # CPython's; without it the prefixes stay registered
        saved = dict(registry)
        try:
            for uri, prefix in prefixes.items():
                if uri not in _NS.values():
                    with contextlib.suppress(ValueError):  # a prefix ElementTree reserves (ns0, ...): its own then
                        ET.register_namespace(prefix, uri)
            return ET.tostring(root, encoding="unicode")
        finally:
            registry.clear()
            registry.update(saved)


@dataclass
class ExportSummary:
    """Sidecars written (new or merged), already holding every tag (left untouched), images skipped (gone or
    without results), and failures (sidecar path, message)."""

    written: int = 0
    unchanged: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"written": self.written, "unchanged": self.unchanged, "skipped": self.skipped,
                "failed": len(self.failures)}  # fmt: skip


def _rows(index: Index) -> Iterator[tuple[str, np.ndarray | None]]:
    for path, scores in index.conn.execute("SELECT path, scores FROM images ORDER BY path"):
        yield stored_name(path), None if scores is None else stored(scores, "score vector", NUM_TAGS)


def export(index: Index, kind: str, selection: Selection) -> ExportSummary:
    """Write (merging) a sidecar of ``kind`` (xmp, hydrus) beside every indexed image that still exists."""
    if kind not in SIDECAR_KINDS:
        raise ValueError(f"kind must be one of {SIDECAR_KINDS}, not {kind!r}")
    summary = ExportSummary()
    tags = index.tags
    for image, scores in list(_rows(index)):
        if scores is None or not os.path.isfile(image):
            summary.skipped += 1
            continue
        target = sidecar_path(image, kind)
        keywords = image_tags(scores, tags, selection)
        try:
            for _ in range(MERGE_TRIES):
                seen = _identity(target)
                existing = _read(target)
                text = (
                    merge_xmp(existing, keywords, display(target))
                    if kind == "xmp"
                    else merge_hydrus(existing, keywords)
                )
                if text == existing:
                    summary.unchanged += 1
                    break
                if _replace(target, text, seen):
                    summary.written += 1
                    break
            else:
                raise SidecarError(f"{display(target)}: changed by another program at each of {MERGE_TRIES} merges")
        except WriteError:  # the disk is full (or failing): every other sidecar would fail the same way
            raise
        except (SidecarError, OutputError) as exc:
            summary.failures.append((target, str(exc)))
    return summary


#: Merges of one sidecar tried while another writer keeps changing it.
MERGE_TRIES = 5


def _identity(path: str) -> list[int] | None:
    """What says the sidecar was not replaced or written since it was read (another export, another program):
    :func:`~i2v_cli.store.file_identity`, None when there is none."""
    try:
        return file_identity(path)
    except OSError:
        return None


def _replace(target: str, text: str, seen: list[int] | None) -> bool:
    """Put the merged ``text`` at ``target`` atomically, unless the sidecar changed since it was read as ``seen``
    (then False: merge again). Two exports at once lost each other's keywords, the last rename winning."""
    return write_bytes(target, text.encode("utf-8"), unless_changed=lambda: _identity(target) == seen)


#: Largest existing sidecar merged (bytes): XMP packets are kilobytes; anything larger is not one to read whole.
MAX_SIDECAR_BYTES = 16 * 1024 * 1024


def _read(path: str) -> str | None:
    """The existing sidecar's text, or None when there is none. Only a regular file is read (opened without
    blocking: a FIFO in its place hung the export for ever, and a link to /dev/zero was read until memory ran out)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SidecarError(f"{display(path)}: cannot read the existing sidecar ({exc.strerror or exc})") from None
    try:
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SidecarError(f"{display(path)}: the existing sidecar is not a regular file; left as it is")
            if st.st_size > MAX_SIDECAR_BYTES:
                raise SidecarError(
                    f"{display(path)}: the existing sidecar is larger than {MAX_SIDECAR_BYTES >> 20} MiB; left as it is"
                )
            data = f.read(MAX_SIDECAR_BYTES + 1)
    except OSError as exc:
        raise SidecarError(f"{display(path)}: cannot read the existing sidecar ({exc.strerror or exc})") from None
    if len(data) > MAX_SIDECAR_BYTES:
        raise SidecarError(f"{display(path)}: the existing sidecar is larger than {MAX_SIDECAR_BYTES >> 20} MiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SidecarError(f"{display(path)}: the existing sidecar is not UTF-8; left as it is") from None
