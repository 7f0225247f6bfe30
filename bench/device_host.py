"""``python -m bench.device_host CONFIG.toml …``: several device nodes in one process (the lightweight fleet).

Each configuration file is one device, built exactly as ``python -m tier0_device --config``
builds it (the same :class:`~services.rpc.node.Node`, the tier's defaults under the file),
but all of them share this process's event loop and interpreter. SIGTERM or Ctrl-C stops
them all gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from services.config import load_config
from services.rpc.node import Node
from tier0_device.app import DEFAULTS, SPEC
from tier0_device.config import DeviceConfig


async def run(configs: list[Path]) -> None:
    """Starts every device, serves until a signal, then stops them all."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nodes = [Node(SPEC, load_config(DeviceConfig, path, overrides=DEFAULTS)) for path in configs]
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        await stop.wait()
    finally:
        await asyncio.gather(*(node.stop() for node in nodes), return_exceptions=True)


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.device_host", description=__doc__)
    parser.add_argument("configs", type=Path, nargs="+", help="one device configuration (TOML) per node")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s host %(levelname)s %(name)s: %(message)s")
    logging.getLogger("opentelemetry.instrumentation.grpc._server").setLevel(logging.ERROR)
    asyncio.run(run(args.configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
