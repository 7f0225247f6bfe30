"""Run in a fresh process: publish version 2 of ``lm`` and stop dead at one step, for a SIGKILL test.

Usage: python -m tests.support.publish_probe WORKDIR STEP
Prints ``at STEP`` and flushes when the step is reached, then sleeps until killed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tests.support.registry import lm_variants, submissions
from tier2_region.registry.pipeline import PipelineOptions, publish_model
from tier2_region.registry.registry import ModelRegistry
from tier2_region.registry.signing_keys import load_keys


def main(workdir: Path, stop_at: str) -> None:
    registry = ModelRegistry(workdir / "registry")
    subs = submissions(lm_variants(workdir / "files-2", seed=1))

    def on_step(step: str) -> None:
        if step == stop_at:
            print(f"at {step}", flush=True)
            while True:
                time.sleep(60)

    publish_model(registry, load_keys(workdir / "keys"), "lm", "2", subs, PipelineOptions(), on_step)
    print("finished", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
