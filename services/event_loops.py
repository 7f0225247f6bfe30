"""Which asyncio event loop a node runs on: ``[server] event_loop``.

``uvloop`` (libuv) runs the same ``grpc.aio`` server with less of the event
loop's own time per call; measured side by side on the demo device model it
served about a tenth more requests at 64 in flight (``bench/README.md``). ``auto``
takes it where it is installed (it is a dependency everywhere but Windows) and
the standard loop otherwise; ``asyncio`` always takes the standard loop.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable

from services.errors import ConfigError

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory of the loop ``choice`` names (one of :data:`EVENT_LOOPS`).

    Raises:
        ConfigError: ``uvloop`` was asked for and is not installed.
    """
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "[server] event_loop is 'uvloop' but uvloop is not installed; install it or choose 'auto' or 'asyncio'"
            ) from None
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: what a running loop is (for the start-up log line)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
