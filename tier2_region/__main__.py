"""``python -m tier2_region [--config FILE.toml]``: run a region node."""

import sys

from services.rpc.node import main
from tier2_region.app import DEFAULTS, SPEC

if __name__ == "__main__":
    sys.exit(main(SPEC, DEFAULTS))
