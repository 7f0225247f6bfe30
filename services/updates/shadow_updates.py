"""A node's shadow installs: a rollout's new version installed *beside* the serving one, never serving.

During a rollout's shadow stage the region sends, besides a model's serving assignment,
a second one with ``shadow`` set: install that version as the model's shadow and run it
on ``shadow_share`` of the requests answered here (:mod:`services.engine.shadow`).

A shadow install is an ordinary :class:`~services.updates.updater.Updater` install —
TUF resolve, gates, resumable download, plaintext check, golden vectors, footprint, the
same journal states and the same crash recovery — over a store, journal and model cache
of its own (``<state_dir>/shadow/…`` and the serving cache's
:meth:`~services.engine.model_cache.ModelCache.shadow_cache`). "Committed" there means
"installed as the shadow": the serving store, and so what answers callers, is never
touched. The shadow cache shares the node's memory budget and yields: the serving cache
evicts idle shadows to make room, a shadow never evicts a serving model (its install
waits, postponed with the budget as reason).

When the desired state no longer names a shadow for a model (the stage ended, or the
rollout was rolled back or aborted), the shadow stops sampling at once — :meth:`ShadowUpdates.assign`
runs for every check-in answer, whatever install is running — and is then unloaded and removed
from the shadow store and journal (with its metric series). Shadow installs run apart from the
serving ones (the node's updates service gives them a task of their own), and an unfinished one
is not resumed at start: the first check-in either names it again (:meth:`ShadowUpdates.apply`
restarts it from its journal) or not (:meth:`ShadowUpdates.retire` removes it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from services.engine.shadow import ShadowAssignment, ShadowRunner
from services.updates.checkin import AssignedVariant, InstalledModel
from services.updates.updater import Updater

log = logging.getLogger("edgecascade.updates")


class ShadowUpdates:
    """Installs and removes the node's shadow versions (see the module docstring).

    Args:
        updater: An updater over the shadow store, journal and cache (never the serving ones).
        runner: The node's shadow runner (None: shadows are installed and reported, never run).
        forget: Called with a model's name and the shadow version kept (empty: none) after a shadow of it was
            removed, so that the metric series of the versions gone are dropped (the node's fleet metrics).
    """

    def __init__(
        self,
        updater: Updater,
        runner: ShadowRunner | None = None,
        forget: Callable[[str, str], None] | None = None,
    ) -> None:
        self.updater = updater
        self.runner = runner
        self._forget = forget
        if runner is not None:
            runner.attach(updater.cache, self._installed_shadow, self._variant)

    def _installed_shadow(self, name: str) -> tuple[str, str] | None:
        committed = self.updater.store.committed(name)
        return (committed.version, committed.variant) if committed is not None else None

    def _variant(self, name: str, version: str) -> str:
        stored = self.updater.store.get(name, version)
        return stored.variant if stored is not None else ""

    def assign(self, assignments: Sequence[AssignedVariant]) -> None:
        """Sampling follows the shadow assignments among ``assignments`` at once (no await, no install).

        A shadow no longer assigned stops being run before this returns; one newly assigned runs once
        it is installed. Called for every check-in answer, even while an install or removal runs.
        """
        if self.runner is not None:
            self.runner.assign({a.name: ShadowAssignment(a.version, a.shadow_share) for a in _shadows(assignments)})

    async def apply(self, assignments: Sequence[AssignedVariant]) -> None:
        """Brings the shadows to the shadow assignments among ``assignments`` (the others are ignored).

        Sampling follows the new assignments at once (:meth:`assign`). Shadows no longer assigned, and
        those of another version or variant than assigned (a shadow is never kept for a revert: it never
        served), are removed first; then the assigned ones are installed (returns when those updates
        ended, as :meth:`Updater.apply`).
        """
        shadows = _shadows(assignments)
        self.assign(shadows)
        await self.retire({a.name: (a.version, a.variant) for a in shadows})
        await self.updater.apply(shadows)

    async def retire(self, keep: Mapping[str, tuple[str, str]]) -> list[str]:
        """Removes every shadow but those of ``keep`` (name → version, variant); returns the models removed.

        A shadow is kept when its latest assignment (its journal entry; the committed version without one)
        is the one in ``keep``. One whose install is running is left for the next call.
        """
        entries = {e.assignment.name: e for e in self.updater.journal.entries()}
        removed = []
        for name in sorted(set(self.updater.store.models()) | set(entries)):
            entry, committed = entries.get(name), self.updater.store.committed(name)
            have = entry.assignment.key if entry else (committed.version, committed.variant) if committed else None
            want = keep.get(name)
            if want is not None and have == want:
                continue
            if await self.updater.remove(name):
                why = "another version is assigned" if want is not None else "no shadow of it is assigned any more"
                log.info("the shadow of model '%s' is removed: %s", name, why)
                removed.append(name)
                if self._forget is not None:
                    self._forget(name, want[0] if want is not None else "")
        return removed

    def installed(self) -> list[InstalledModel]:
        """The shadow installs, as ``GetTierInfo`` shows them (``shadow`` set; never reported at check-in)."""
        return [replace(row, shadow=True) for row in self.updater.installed()]

    async def recover(self) -> None:
        """Brings the shadow installs back after a stop or a crash (as :meth:`Updater.recover`, without resuming).

        Shadows are loaded again but run only once a check-in names them again (the share is not kept). An
        unfinished install is not resumed: the first check-in restarts it (:meth:`apply`) if it still assigns
        that shadow, or it is removed (:meth:`retire`).
        """
        await self.updater.recover(resume=False)

    async def close(self) -> None:
        """Stops sampling and the shadow runs in progress, cancels the installs in flight, drains the shadow cache."""
        if self.runner is not None:
            await self.runner.close()
        await self.updater.close()
        await self.updater.cache.close()


def _shadows(assignments: Sequence[AssignedVariant]) -> list[AssignedVariant]:
    return [a for a in assignments if a.shadow and 0 < a.shadow_share <= 1]
