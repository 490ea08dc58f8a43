"""``i2v serve``: the tagger, the feature model and an index behind an HTTP API and a web page."""

from __future__ import annotations

import click

from ..config import BACKENDS, PRECISIONS
from .common import CONTEXT_SETTINGS, FiniteRange, UsageFailure, default_workers


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--db", metavar="FILE", help="An index (`i2v index`) to search and browse. Without it: tagging only.")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on. Anything but loopback needs --token."
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--token",
    envvar="I2V_TOKEN",
    metavar="TOKEN",
    help="Bearer token every API call must send (Authorization: Bearer TOKEN). Default: $I2V_TOKEN.",
)
@click.option(
    "--tag-weights",
    metavar="FILE",
    help="Tag model weights. Default: $I2V_WEIGHTS, then the cache (`i2v weights download`).",
)
@click.option("--feature-weights", metavar="FILE", help="Feature model weights. Default: $I2V_WEIGHTS, then the cache.")
@click.option(
    "--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]", help="Where the networks run."
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help="Arithmetic of the networks (fp32 gives the reference scores).",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="What runs the networks (auto: ONNX Runtime on a CPU in fp32 when installed).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="Most images in one network batch, gathered from concurrent requests.",
)
@click.option(
    "--max-wait-ms",
    type=FiniteRange(0),
    default=5.0,
    show_default=True,
    help="Longest an image waits for others to fill its batch.",
)
@click.option(
    "--decode-threads",
    type=click.IntRange(1),
    default=None,
    help="Threads decoding uploads (off the event loop). Default: cores, at most 4 (as `i2v tag -j`).",
)
@click.option(
    "--max-upload-mb",
    type=FiniteRange(0, min_open=True),
    default=32.0,
    show_default=True,
    help="Largest request body, in MiB (larger: 413).",
)
@click.option("--max-files", type=click.IntRange(1), default=64, show_default=True, help="Most images in one request.")
@click.option("--timeout", "timeout_s", type=FiniteRange(0, min_open=True), default=60.0, show_default=True,
              help="Seconds a request may take to arrive (its head, then its body), and to be answered.")  # fmt: skip
@click.option("--max-connections", type=click.IntRange(1), default=64, show_default=True,
              help="Most connections and requests at once (more: 503); with --max-upload-mb, it bounds the memory "
              "uploads take.")  # fmt: skip
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="A page origin whose browser POSTs are taken (repeatable), e.g. https://tagger.example.org behind "
              "a proxy that rewrites Host. Other origins' are refused (403).")  # fmt: skip
def serve(
    db: str | None,
    host: str,
    port: int,
    token: str | None,
    tag_weights: str | None,
    feature_weights: str | None,
    device: str,
    precision: str,
    backend: str,
    max_batch: int,
    max_wait_ms: float,
    decode_threads: int | None,
    max_upload_mb: float,
    max_files: int,
    timeout_s: float,
    max_connections: int,
    allow_origins: tuple[str, ...],
) -> None:
    """Serve the tagger, the feature model and an index over HTTP: a JSON API and a web page.

    The models are loaded once; images of concurrent requests are gathered into network batches. Loopback
    only unless --token is given; SIGTERM or Ctrl-C lets the requests in flight finish, then stops (a second
    SIGTERM or Ctrl-C stops at once).

    \b
    Examples:
      i2v serve --db collection.db                      # then open http://127.0.0.1:8000/
      curl -F image=@a.png 'http://127.0.0.1:8000/v1/tag?threshold=0.4'
      I2V_TOKEN=secret i2v serve --host 0.0.0.0 --db collection.db
    """
    # Imported here, not at the top: `i2v serve -h` answers without loading torch or the web stack.
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as exc:
        missing = exc.name
        raise UsageFailure(
            f"i2v serve needs the serve extra ({missing} is missing): pip install fastapi uvicorn python-multipart "
            "(in the checkout: pip install '.[serve]')"
        ) from None
    from ..errors import I2VError
    from ..inference import describe
    from ..serve.guard import check_bind, guarded_protocol, listening_sockets, origin_of
    from ..serve.server import Server
    from ..serve.service import Settings, load_service
    from ..writers import display

    settings = Settings(
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        decode_threads=decode_threads or default_workers(),
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_files=max_files,
        request_timeout_s=timeout_s,
    )
    try:
        check_bind(host, token)
        origins = [origin_of(o) for o in allow_origins]
    except I2VError as exc:
        raise UsageFailure(str(exc)) from None
    try:  # before the models load: an address in use is said at once
        socks = listening_sockets(host, port)
    except OSError as exc:
        raise UsageFailure(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None
    try:
        service = load_service(tag_weights, feature_weights, db=db, device=device, precision=precision,
                               backend=backend, settings=settings)  # fmt: skip
    except I2VError as exc:
        for sock in socks:
            sock.close()
        raise UsageFailure(str(exc)) from None
    app = create_app(service, token=token, allowed_origins=origins)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", server_header=False,
                            timeout_graceful_shutdown=int(timeout_s) + 1, timeout_keep_alive=5,
                            http=guarded_protocol(timeout_s, max_connections), ws="none")  # fmt: skip
    shown = f"[{host}]" if ":" in host else host
    where = f", index {display(db)}" if db else ""
    port = socks[0].getsockname()[1]  # the real one when 0 was asked for
    click.echo(f"i2v: serving http://{shown}:{port}/ ({describe(service.nets['tag'])}{where})", err=True)
    Server(config, on_forced=service.abandon).run(sockets=socks)
