"""How much of its configured capacity a node's engine may use now.

A device's thermal policy sets it (``tier0_device.thermal``); the engine only
reads it, so the engine knows nothing of temperatures. Each *shrink step* halves
every batch cap and the run slots (onnxruntime runs at once), never below the
floors; a throttled node may prefer an int8 variant among the versions it has
loaded, and a critical one sends new work upstream (``fallback_reason``) while
an upstream is there to take it.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.inference import FallbackReason

# Signed variant name of an installed version (``fp32``, ``int8``, ``int8-per-channel`` …), in its entry.
VARIANT_PROPERTY = "edgecascade.variant"


@dataclass
class Throttle:
    """The limits in force (the defaults: none).

    Attributes:
        shrink_steps: Halvings of the batch caps and run slots.
        batch_floor: The least a batch cap shrinks to.
        slot_floor: The least the run slots shrink to.
        prefer_int8: Unversioned requests go to a loaded int8 variant of the model when there is one.
        forward: New requests go upstream for this reason while an upstream is available (None: served here).
    """

    shrink_steps: int = 0
    batch_floor: int = 1
    slot_floor: int = 1
    prefer_int8: bool = False
    forward: FallbackReason | None = None

    def rows(self, configured: int) -> int:
        """The batch cap of a model configured with ``configured`` rows (never above it)."""
        return min(configured, max(self.batch_floor, configured >> self.shrink_steps))

    def slots(self, configured: int) -> int:
        """The run slots of a pool configured with ``configured`` (never above it)."""
        return min(configured, max(self.slot_floor, configured >> self.shrink_steps))

    @property
    def active(self) -> bool:
        """Whether anything is limited."""
        return bool(self.shrink_steps or self.prefer_int8 or self.forward is not None)


def is_int8(variant: str) -> bool:
    """Whether a variant name is an int8 one (``int8``, ``int8-per-channel`` …)."""
    return variant == "int8" or variant.startswith("int8-")
