"""A node's enrollment and check-ins (devices and edges): the loop that keeps it on its desired state.

With ``[updates] state_dir`` the node keeps its keys there (created on first
start), enrolls once with its upstream using the one-time token, and then
checks in every ``check_interval_s`` (jittered) through a
:class:`~services.ticker.Ticker`: a signed report of what it runs goes up, the
desired state comes back and is handed to the node's
:class:`~services.updates.checkin.UpdateTarget` in the background — its shadow
assignments (a rollout's shadow stage) to the node's shadow installs
(:class:`~services.updates.shadow_updates.ShadowUpdates`) instead, in a background
task of their own: a long shadow download never delays a serving update (a rollback)
nor the other way round. Which shadows are sampled follows every check-in answer at
once, whatever install is running (a withdrawn shadow stops being run before the
next request). An upstream
that is down costs a check-in, never serving: the node keeps what it has and
tries again at the next tick (enrollment retries sooner, with backoff).
Without ``state_dir`` the component does nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import onnxruntime
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from protos.edgecascade.v1 import mesh_pb2
from services.atomic_files import write_atomically
from services.errors import ConfigError, EdgecascadeError, UnavailableError
from services.rpc.artifact_client import GrpcArtifactSource
from services.rpc.components import NodeContext
from services.rpc.fleet_client import FleetClient, installed_to_proto
from services.rpc.server import ServiceBinding
from services.ticker import Ticker
from services.tier_config import UpdatesSection
from services.updates.checkin import (
    ROLES,
    AssignedVariant,
    DesiredState,
    NodeFacts,
    NoUpdates,
    UpdateTarget,
    machine_hardware_class,
)
from services.updates.identity import FileKeyProvider, NodeKeys
from services.updates.installed_store import InstalledStore
from services.updates.model_fetcher import ModelFetcher
from services.updates.shadow_updates import ShadowUpdates
from services.updates.update_journal import Assignment, UpdateJournal, UpdateState
from services.updates.updater import Updater

log = logging.getLogger("edgecascade.updates")

ENROLLMENT_FILE = "enrollment.json"
SHADOW_DIR = "shadow"  # under the state directory: the shadow installs' store, journal and TUF client


def updates_settings(context: NodeContext) -> UpdatesSection:
    """The ``[updates]`` section of a node that has one.

    Raises:
        ConfigError: The tier has no ``[updates]`` section.
    """
    settings = getattr(context.config, "updates", None)
    if not isinstance(settings, UpdatesSection):
        raise ConfigError(f"the {context.identity.tier} configuration has no [updates] section")
    return settings


class NodeUpdatesService:
    """Enrollment and periodic check-in of one node.

    Args:
        context: The node's context (its configuration has an ``[updates]`` section).
        target: What applies the desired state (the node's updater; :class:`NoUpdates` reports only).

    Raises:
        ConfigError: The state directory or keys are unusable, the token file cannot be read, or there is no upstream.
    """

    def __init__(self, context: NodeContext, target: UpdateTarget | None = None) -> None:
        settings = updates_settings(context)
        self._settings = settings
        self._context = context
        self._target: UpdateTarget = target or NoUpdates()
        self._client: FleetClient | None = None
        self._ticker: Ticker | None = None
        self._apply: asyncio.Task[None] | None = None  # serving updates
        self._apply_shadows: asyncio.Task[None] | None = None  # shadow installs and removals
        self._failing = False
        self.desired: DesiredState | None = None
        self.check_ins = 0
        self.failures = 0
        self._last_check_in: float | None = None  # monotonic time of the last successful check-in
        self._last_failure = ""  # why the last enrollment or check-in failed
        self._updater: Updater | None = None
        self._shadow: ShadowUpdates | None = None
        self._source: GrpcArtifactSource | None = None
        if not settings.state_dir:
            return
        config = context.config
        if not config.upstream.address:
            raise ConfigError("[updates] state_dir is set but there is no [upstream] address to check in with")
        self._state_dir = Path(settings.state_dir)
        self._keys: NodeKeys = FileKeyProvider(self._state_dir / "keys").keys()
        self._token = settings.enrollment_token
        if settings.enrollment_token_file:
            try:
                self._token = Path(settings.enrollment_token_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"[updates] enrollment_token_file {settings.enrollment_token_file} cannot be read: {exc.strerror}"
                ) from None
        self._client = FleetClient(config.upstream.address, context.tracer_provider, config.server.max_message_bytes)
        self._ticker = Ticker("check-in", settings.check_interval_s, self._tick, jitter=settings.jitter)
        if settings.trusted_root and target is None:
            self._updater, self._shadow = self._build_updater(context, settings)
            self._target = self._updater

    def _build_updater(self, context: NodeContext, settings: UpdatesSection) -> tuple[Updater, ShadowUpdates]:
        """The node's updater over its upstream's artifact service (the cache then serves only what it installs),
        and its shadow installs: a second updater over ``<state_dir>/shadow`` and the cache's shadow cache."""
        config, cache = context.config, context.cache
        if cache is None:
            raise ConfigError("[updates] trusted_root needs the node's model cache")
        try:
            root = Path(settings.trusted_root).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"[updates] trusted_root {settings.trusted_root} cannot be read: {exc.strerror}"
            ) from None
        store = InstalledStore(self._state_dir / "installed")
        cache.use_source(store.repository(), store.opener(context.identity.node_id, self._keys.agreement))
        # Each file's transfer has a deadline: an upstream that trickles bytes or never ends cannot hold an update.
        self._source = GrpcArtifactSource(
            config.upstream.address, config.server.max_message_bytes, timeout_s=settings.transfer_timeout_s
        )
        try:
            fetcher = ModelFetcher(
                self._source, root, self._state_dir / "tuf", f"the artifact service at {config.upstream.address}"
            )
        except EdgecascadeError as exc:
            self._source.close()
            raise ConfigError(f"[updates] trusted_root {settings.trusted_root}: {exc.message}") from None
        facts = self.facts()
        metrics = context.fleet_metrics
        on_state = on_failure = None
        if metrics is not None:
            # What serves is what the store installed: its variant labels the node's request metrics.
            metrics.use_variants(lambda name, version: getattr(store.get(name, version), "variant", ""))

            def on_state(state: UpdateState, a: Assignment) -> None:
                metrics.updated(state.value, a.name, a.version, a.variant)

            def on_failure(a: Assignment, kind: str, reason: str) -> None:
                # Read at the failure: the node's log is in place before any update runs, but not before this is built.
                if metrics.log is not None:
                    metrics.log.update_failed(a.name, a.version, a.variant, kind, reason)

        updater = Updater(
            context.identity.node_id,
            self._keys,
            fetcher,
            store,
            cache,
            facts.memory_budget_bytes,
            facts.hardware_class,
            facts.onnxruntime_version,
            lambda: shutil.disk_usage(self._state_dir).free,
            on_state=on_state,
            on_failure=on_failure,
        )
        # Shadow installs go through the same checks into a store of their own; "committed" there means
        # "installed as the shadow". Their own TUF client and staging keep their downloads apart from
        # the serving ones; their states reach the same metrics (a refused shadow is a failed install).
        shadow_dir = self._state_dir / SHADOW_DIR
        shadow_store = InstalledStore(shadow_dir / "installed")
        shadow_cache = cache.shadow_cache(
            shadow_store.repository(), shadow_store.opener(context.identity.node_id, self._keys.agreement)
        )
        shadow_fetcher = ModelFetcher(
            self._source, root, shadow_dir / "tuf", f"the artifact service at {config.upstream.address}"
        )
        shadow_updater = Updater(
            context.identity.node_id,
            self._keys,
            shadow_fetcher,
            shadow_store,
            shadow_cache,
            facts.memory_budget_bytes,
            facts.hardware_class,
            facts.onnxruntime_version,
            lambda: shutil.disk_usage(self._state_dir).free,
            journal=UpdateJournal(shadow_dir / "journal"),
            on_state=on_state,
            on_failure=on_failure,
        )
        forget = metrics.forget_shadow if metrics is not None else None
        return updater, ShadowUpdates(shadow_updater, context.shadows, forget)

    @property
    def bindings(self) -> Sequence[ServiceBinding]:
        """None: the node calls out, nothing calls in."""
        return []

    @property
    def enrolled(self) -> bool:
        """Whether this node has enrolled (its enrollment is recorded in the state directory)."""
        return self._settings.state_dir != "" and (self._state_dir / ENROLLMENT_FILE).is_file()

    def tier_info(self, response: mesh_pb2.GetTierInfoResponse) -> None:
        """Adds enrollment, check-ins and each model's update state to the node's answer (nothing without state_dir)."""
        if not self._settings.state_dir:
            return
        age = -1.0 if self._last_check_in is None else time.monotonic() - self._last_check_in
        desired = [a for a in self.desired.assignments if not a.shadow] if self.desired is not None else []
        installed = list(self._target.installed())
        if self._shadow is not None:
            installed += self._shadow.installed()
            # The node's memory holds its shadows too (the serving cache reports only its own models).
            response.cache.used_bytes += self._shadow.updater.cache.used_bytes
        response.updates.CopyFrom(
            mesh_pb2.UpdateStatus(
                enrolled=self.enrolled,
                installs=self._updater is not None,
                check_ins=self.check_ins,
                failed_check_ins=self.failures,
                last_check_in_age_s=age,
                installed=installed_to_proto(installed),
                desired=[mesh_pb2.DesiredVersion(name=a.name, version=a.version, variant=a.variant) for a in desired],
                last_error=self._last_failure,
            )
        )

    async def start(self) -> None:
        """Recovers what the updater left (serving exactly one verified version per model), then checks in."""
        if self._updater is not None:
            # Serving comes back at once from what is committed; an update a crash interrupted
            # resumes in the background, so an upstream that is down never delays the start.
            await self._updater.recover(resume=False)
            if self._shadow is not None:
                # An unfinished shadow install is not resumed: the first check-in restarts it if it still
                # names that shadow, or removes it if not (a withdrawn shadow is never downloaded again).
                await self._shadow.recover()
            self._apply = self._background(self._updater.resume(), "resume updates")
        if self._ticker is not None:
            self._ticker.start()

    async def stop(self) -> None:
        """Stops checking in; an update in progress is cancelled (its journal lets it resume)."""
        if self._ticker is not None:
            await self._ticker.stop()
        tasks = [t for t in (self._apply, self._apply_shadows) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._updater is not None:
            # The updates belong to no caller (cancelling the apply leaves them running): they end here, unrecorded.
            await self._updater.close()
        if self._shadow is not None:
            await self._shadow.close()
        if self._client is not None:
            await self._client.close()
        if self._source is not None:
            self._source.close()

    async def apply(self, assignments: Sequence[AssignedVariant]) -> None:
        """Brings the node toward a desired state: serving assignments to the node's update target, shadow
        assignments to its shadow installs (ignored by a node without them), in parallel.

        Returns when both are done (see :meth:`~services.updates.updater.Updater.apply`).
        """
        serving = [a for a in assignments if not a.shadow]
        work = [self._target.apply(serving)]
        if self._shadow is not None:
            work.append(self._shadow.apply([a for a in assignments if a.shadow]))
        await asyncio.gather(*work)

    @staticmethod
    def _background(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Runs an update in its own task; a failure is logged (the updater records its own reasons)."""
        task = asyncio.create_task(work, name=name)

        def done(finished: asyncio.Task[None]) -> None:
            if not finished.cancelled() and finished.exception() is not None:
                log.error("%s failed", name, exc_info=finished.exception())

        task.add_done_callback(done)
        return task

    def facts(self) -> NodeFacts:
        """What this node reports about itself."""
        config = self._context.config
        disk = shutil.disk_usage(self._state_dir).free if self._settings.state_dir else 0
        return NodeFacts(
            node_id=self._context.identity.node_id,
            tier=ROLES.get(self._context.identity.tier, self._context.identity.tier),
            hardware_class=self._settings.hardware_class or machine_hardware_class(),
            memory_budget_bytes=config.cache.budget,
            onnxruntime_version=onnxruntime.__version__,
            free_disk_bytes=disk,
        )

    async def _tick(self) -> None:
        assert self._client is not None
        assert self._ticker is not None
        try:
            if not self.enrolled:
                await self._enroll()
            desired = await self._client.check_in(
                self.facts(), self._target.installed(), self._keys, self._settings.call_timeout_s
            )
        except EdgecascadeError as exc:
            self.failures += 1
            self._last_failure = exc.message
            # One warning per streak of failures: an upstream that is down must not flood the log.
            (log.debug if self._failing else log.warning)("check-in failed: %s", exc.message)
            self._failing = True
            return
        if self._failing:
            log.info("check-in works again")
        self._failing = False
        self._last_failure = ""
        self.check_ins += 1
        self._last_check_in = time.monotonic()
        self.desired = desired
        if desired.check_interval_s:
            self._ticker.interval_s = float(desired.check_interval_s)
        for item in desired.unassigned:
            log.info("model %s version %s is not assigned to this node: %s", item.name, item.version, item.reason)
        serving = [a for a in desired.assignments if not a.shadow]
        shadows = [a for a in desired.assignments if a.shadow]
        if self._shadow is not None:
            self._shadow.assign(shadows)  # at once: a withdrawn shadow must not wait for an install to end
        # Installing may take long; the next check-in reports its progress meanwhile. Serving updates and
        # shadow installs have a task each, so that neither waits for the other.
        if self._apply is None or self._apply.done():
            self._apply = self._background(self._target.apply(serving), "apply desired state")
        if self._shadow is not None and (self._apply_shadows is None or self._apply_shadows.done()):
            self._apply_shadows = self._background(self._shadow.apply(shadows), "apply shadow assignments")

    async def _enroll(self) -> None:
        assert self._client is not None
        if not self._token:
            raise ConfigError(
                "this node is not enrolled and has no enrollment token: set [updates] enrollment_token "
                "(from `edgecascade fleet token`)"
            )
        client, token, facts, keys = self._client, self._token, self.facts(), self._keys
        timeout = self._settings.call_timeout_s
        interval = 0
        # An upstream that is still starting answers UNAVAILABLE: retry for a while, with backoff and jitter.
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(UnavailableError),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
            stop=stop_after_delay(self._settings.check_interval_s),
            reraise=True,
        ):
            with attempt:
                interval = await client.enroll(token, facts, keys, timeout)
        record = {"node_id": facts.node_id, "identity_public_key": keys.identity_public.hex()}
        write_atomically(self._state_dir / ENROLLMENT_FILE, (json.dumps(record) + "\n").encode())
        log.info("enrolled as %s", facts.node_id)
        if interval and self._ticker is not None:
            self._ticker.interval_s = float(interval)
