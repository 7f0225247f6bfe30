"""``python -m tier0_device [--config FILE.toml]``: run a device node."""

import sys

from services.rpc.node import main
from tier0_device.app import DEFAULTS, SPEC

if __name__ == "__main__":
    sys.exit(main(SPEC, DEFAULTS))
