"""The web page at ``/``: server-rendered HTML (the gallery of an index, searched with the booru grammar) and a
little JavaScript (static/page.js) that calls the JSON API for an image's tags and neighbours and for a dropped
file. No front-end build step; every text that comes from the index or the query is escaped."""

from __future__ import annotations

import html
from importlib import resources
from string import Template
from typing import Any
from urllib.parse import quote

from ..errors import I2VError
from ..writers import display

#: Images a page of the gallery shows.
PAGE_SIZE = 60
_STATIC = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}


def _read(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def static_file(name: str) -> tuple[bytes, str] | None:
    """One of the page's fixed files (bytes, media type); None for any other name."""
    if name not in _STATIC:
        return None
    return _read(name).encode("utf-8"), _STATIC[name]


def render_page(service: Any, query: str, page: int) -> str:
    """The page for ``query`` (may be empty: the whole index) at gallery page ``page``."""
    status, status_class, tiles, nav = "", "", [], ""
    if service.index is None:
        status = "No index: start i2v serve with --db FILE to browse one. Dropping an image still shows its tags."
    else:
        try:
            hits = service.index.search(query, k=(page + 1) * PAGE_SIZE + 1)
        except I2VError as exc:
            status, status_class, hits = str(exc), "error", []
        shown = hits[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
        for hit in shown:
            name = html.escape(display(hit["path"]))
            tiles.append(f'<a href="/v1/images/{hit["id"]}" data-id="{hit["id"]}" title="{name}">'
                         f'<img src="/v1/images/{hit["id"]}/thumb" alt="{name}" loading="lazy"></a>')  # fmt: skip
        if not status:
            first = page * PAGE_SIZE + 1
            status = f"{first}-{first + len(shown) - 1}" if shown else "No image matches"
            status += f" of the images matching {query!r}" if query else " of the indexed images"
        links = []
        q = html.escape(quote(query), quote=True)
        if page > 0:
            links.append(f'<a href="/?q={q}&amp;page={page - 1}">previous</a>')
        if len(hits) > (page + 1) * PAGE_SIZE:
            links.append(f'<a href="/?q={q}&amp;page={page + 1}" id="next">next</a>')
        nav = " ".join(links)
    return Template(_read("page.html")).substitute(
        q=html.escape(query, quote=True),
        status=html.escape(status),
        status_class=status_class,
        gallery="\n".join(tiles),
        nav=nav,
    )


def login_page() -> str:
    """The sign-in form shown at ``/`` when the server has a token and the browser has not given it."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>i2v: sign in</title></head><body>'
        '<form method="post" action="/login"><p>This i2v server needs its token.</p>'
        '<input type="password" name="token" autofocus> <button type="submit">Sign in</button></form></body></html>'
    )
