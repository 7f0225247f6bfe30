"""``python -m tier1_edge [--config FILE.toml]``: run a edge node."""

import sys

from services.rpc.node import main
from tier1_edge.app import DEFAULTS, SPEC

if __name__ == "__main__":
    sys.exit(main(SPEC, DEFAULTS))
