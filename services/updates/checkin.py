"""What a node says at check-in and what it gets back, without the wire.

A node reports its facts and what it runs; the region answers its desired
state: per model deployed to it, the version and variant that fit it with the
variant's content key granted to it (:class:`AssignedVariant`), or why nothing
fits (:class:`Unassigned`). An :class:`UpdateTarget` — the node's updater —
takes the assignments and reports what it runs; :class:`NoUpdates` stands in
where nothing installs (a node that only reports).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.updates.key_grants import KeyGrant


def machine_hardware_class() -> str:
    """This machine's hardware class as the registry names it by default (``cpu-x86_64``, ``cpu-aarch64``).

    The registry signs a variant for the class of the machine that profiled it unless the
    publisher names others; a node that is not configured with a class reports this one.
    """
    return f"cpu-{platform.machine().lower() or 'unknown'}"


@dataclass(frozen=True)
class NodeFacts:
    """What a node is, as it reports itself at enrollment and check-in.

    Attributes:
        node_id: Its id (as ``[server] node_id`` takes it).
        tier: ``device`` or ``edge``.
        hardware_class: The device class variants are published for; empty = unknown.
        memory_budget_bytes: What its model cache may hold.
        onnxruntime_version: The runtime it loads models with, e.g. ``1.20.1``.
        free_disk_bytes: Free space in its state directory.
    """

    node_id: str
    tier: str
    hardware_class: str
    memory_budget_bytes: int
    onnxruntime_version: str
    free_disk_bytes: int = 0


@dataclass(frozen=True)
class InstalledModel:
    """One model on a node and where its update stands (assigned … committed, or refused).

    ``shadow``: a shadow install (a rollout's shadow stage), beside the serving version and never
    serving; reported in ``GetTierInfo`` only, never at check-in (the region keys its inventory by model).
    """

    name: str
    version: str
    variant: str
    state: str
    last_error: str = ""
    shadow: bool = False


@dataclass(frozen=True)
class AssignedVariant:
    """The version and variant of a model the node should run, with its content key granted to the node.

    With ``shadow`` the version is to be installed *beside* the serving version of the same model (checked
    as any install, never serving) and run on ``shadow_share`` (in (0, 1]) of the model's locally
    answered requests, its answers compared with the serving ones and discarded.
    """

    name: str
    version: str
    variant: str
    target_path: str
    grant: KeyGrant
    shadow: bool = False
    shadow_share: float = 0.0


@dataclass(frozen=True)
class Unassigned:
    """A model deployed to the node that it does not get, and why."""

    name: str
    version: str
    reason: str


@dataclass(frozen=True)
class DesiredState:
    """The region's answer to a check-in."""

    assignments: tuple[AssignedVariant, ...] = ()
    unassigned: tuple[Unassigned, ...] = ()
    check_interval_s: int = 0


# A node's tier, as ``edgecascade.served_by`` names it, and as the fleet names it.
ROLES = {"tier0": "device", "tier1": "edge", "tier2": "region"}


class UpdateTarget(Protocol):
    """The node's updater, as the check-in loop sees it."""

    async def apply(self, assignments: Sequence[AssignedVariant]) -> None:
        """Brings the node toward the assigned versions (may take long; returns when done or refused)."""
        ...

    def installed(self) -> list[InstalledModel]:
        """What the node runs now, with the state of any update."""
        ...


class NoUpdates:
    """A node that reports but installs nothing (no updater configured)."""

    async def apply(self, assignments: Sequence[AssignedVariant]) -> None:
        """Ignores the assignments."""

    def installed(self) -> list[InstalledModel]:
        """Nothing."""
        return []
