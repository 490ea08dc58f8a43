"""uvicorn's server with one rule changed: a second SIGTERM (or SIGINT) during the graceful shutdown forces the exit.

uvicorn forces it only on a second SIGINT (Ctrl-C twice). A process manager sends SIGTERM, and again before it
kills: with ``--timeout 60`` the requests in flight could hold the server past Docker's or systemd's grace period,
and the second SIGTERM was ignored. Forced, the server stops waiting for them, drops their connections and exits
at once with the signal's status (143), its temporary folder removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn


class Server(uvicorn.Server):
    """``uvicorn.Server`` whose second signal (SIGTERM or SIGINT, the ones it handles) forces the exit;
    ``on_forced`` runs when it does, before the application's shutdown, which it must make quick."""

    def __init__(self, config: uvicorn.Config, on_forced: Callable[[], Any] | None = None) -> None:
        super().__init__(config)
        self.on_forced = on_forced

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        again = self.should_exit  # already shutting down: this signal forces the exit, whichever it is
        super().handle_exit(sig, frame)
        if not again:
            return
        self.force_exit = True
        with contextlib.suppress(RuntimeError):  # no loop running (yet or any more): the flag is enough
            # In the event loop, not in the signal handler: end the connections still open.
            asyncio.get_running_loop().call_soon_threadsafe(self._drop_connections)

    def _drop_connections(self) -> None:
        """Abort the connections still open: nothing waits for their answers now (on Python 3.12 and later the
        listening servers' ``wait_closed`` would wait for them)."""
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets=sockets)
        if self.force_exit:
            if self.on_forced is not None:
                self.on_forced()
            # uvicorn skips the application's shutdown when forced, and its lifespan task, left waiting, was
            # cancelled at exit with a traceback on stderr. Run it: ``on_forced`` has made it quick.
            await self.lifespan.shutdown()
