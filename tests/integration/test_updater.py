"""The updater on a real registry: installs under load, refuses what fails a check, never leaves plaintext on disk.

Each node here is real: keys in files, a python-tuf client over the registry's
repository directory, the installed store, a model cache running onnxruntime,
and the updater. Models are real tiny char-LMs whose answers tell versions apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from services.engine.model_repository import ModelEntry
from services.errors import EdgecascadeError, PreconditionError
from services.updates.checkin import AssignedVariant, InstalledModel, UpdateTarget
from services.updates.installed_store import InstalledStore
from services.updates.key_grants import wrap_key
from services.updates.update_journal import Assignment
from tests.support.registry import DirectorySource, RegistryKit, new_registry
from tests.support.updater_node import (
    MB,
    PROBE,
    Published,
    UpdaterNode,
    apply,
    assigned_version,
    assignment,
    build_node,
    grant,
    model_plaintexts,
    plaintext_leaks,
    publish_real,
    run_model,
    serving_versions,
)


@dataclasses.dataclass
class World:
    """A registry with version 1 of ``lm`` published, and a node serving it."""

    tmp: Path
    kit: RegistryKit
    source: DirectorySource
    v1: Published
    node: UpdaterNode
    nodes: list[UpdaterNode]

    def build(self, state: Path | None = None, **options: Any) -> UpdaterNode:
        node = build_node(state or self.node.state, self.source, self.kit.registry.repository.trusted_root(), **options)
        self.nodes.append(node)
        return node

    def assign(self, published: Published, node: UpdaterNode | None = None) -> Assignment:
        node = node or self.node
        return assignment(self.kit, published, node.node_id, node.keys.agreement_public)


class GrowingRss:
    """Process memory as the loader reads it (before and after each load), growing by ``gain`` per load."""

    def __init__(self) -> None:
        self.value = 500 * MB
        self.gain = 0
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls % 2 == 0:
            self.value += self.gain
        return self.value


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    kit = new_registry(tmp_path)
    v1 = publish_real(kit, version="1", seed=1)
    source = DirectorySource(kit.registry.repository_dir)
    nodes: list[UpdaterNode] = []
    node = build_node(tmp_path / "node", source, kit.registry.repository.trusted_root(), rss=GrowingRss())
    nodes.append(node)
    w = World(tmp_path, kit, source, v1, node, nodes)
    [row] = await apply(node, w.assign(v1))
    assert (row.version, row.state, row.last_error) == ("1", "committed", "")
    yield w
    for n in w.nodes:
        await n.close()


async def answer(node: UpdaterNode) -> np.ndarray[Any, Any]:
    model = await node.cache.get("lm")
    return (await node.cache.run(model, PROBE))["probs"]


def answers_of(published: Published) -> np.ndarray[Any, Any]:
    return run_model(published.plaintext, PROBE)


def staged_blob(node: UpdaterNode, published: Published, kit: RegistryKit) -> list[Path]:
    """Staging files of a published variant's encrypted blob (complete or partial)."""
    sha = kit.registry.repository.targets()[published.target_path].hashes["sha256"]
    return list(node.fetcher.staging_dir.glob(f"{sha}.*"))


async def test_an_update_swaps_versions_under_load_without_a_failed_request(world: World) -> None:
    v2 = publish_real(world.kit, version="2", seed=2)
    old, new = answers_of(world.v1), answers_of(v2)
    assert not np.allclose(old, new)
    acquired: list[str] = []  # the version each request got, in the order they got it
    answered: list[tuple[str, str]] = []  # (version held, version its answer came from)
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            try:
                model = await world.node.cache.get("lm")
                acquired.append(model.version)
                got = (await world.node.cache.run(model, PROBE))["probs"]
            except EdgecascadeError as exc:
                failures.append(exc)
                continue
            answered.append((model.version, "1" if np.allclose(got, old) else "2" if np.allclose(got, new) else "?"))
            await asyncio.sleep(0)

    clients = [asyncio.create_task(client()) for _ in range(16)]
    await asyncio.sleep(0.05)
    rows = await apply(world.node, world.assign(v2))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*clients)

    assert failures == []
    # Requests that held version 1 when the swap came finished on it; every answer is its version's.
    assert all(held == came for held, came in answered) and len(answered) == len(acquired)
    assert acquired[0] == "1" and acquired[-1] == "2"
    # Once a request got the new version, no later request got the old one: the swap is atomic.
    assert "1" not in acquired[acquired.index("2") :]
    assert [(r.name, r.version, r.variant, r.state, r.last_error) for r in rows] == [
        ("lm", "2", "fp32", "committed", "")
    ]
    assert serving_versions(world.node, "lm") == ["2"]
    store = world.node.store
    assert (store.committed("lm").version, store.previous("lm").version) == ("2", "1")  # type: ignore[union-attr]


async def test_the_store_keeps_the_committed_and_previous_versions_only(world: World) -> None:
    for version, seed in (("2", 2), ("3", 3)):
        await apply(world.node, world.assign(publish_real(world.kit, version=version, seed=seed)))
    installed = world.node.state / "installed" / "lm"
    assert sorted(p.name for p in installed.iterdir()) == ["2", "3"]
    assert serving_versions(world.node, "lm") == ["3"]
    # A local revert serves the previous version again, decrypted from its blob.
    reverted = await world.node.updater.revert("lm")
    assert (reverted.version, serving_versions(world.node, "lm")) == ("2", ["2"])


async def test_a_restart_decrypts_the_committed_version_again_and_no_plaintext_is_on_disk(world: World) -> None:
    v2 = publish_real(world.kit, version="2", seed=2)
    await apply(world.node, world.assign(v2))
    await world.node.close()
    world.nodes.remove(world.node)

    restarted = world.build()
    rows = await restarted.updater.recover()
    assert [(r.version, r.state) for r in rows] == [("2", "committed")]
    assert serving_versions(restarted, "lm") == ["2"]
    assert np.allclose(await answer(restarted), answers_of(v2))
    # Nothing on disk is, or contains, a model's plaintext: blobs stay encrypted, keys stay wrapped.
    assert plaintext_leaks(restarted.state, model_plaintexts(world.kit.files)) == []
    for blob in (restarted.state / "installed").rglob("model.ecm"):
        assert blob.read_bytes().startswith(b"ECM1")


async def test_a_store_refuses_plaintext_by_hand(world: World, tmp_path: Path) -> None:
    with pytest.raises(PreconditionError, match="installs models via its updater"):
        world.node.cache.repository.add("lm", world.v1.plaintext)


def other_node_grant(w: World, v2: Published) -> Assignment:
    stranger = X25519PrivateKey.generate().public_key().public_bytes_raw()
    a = w.assign(v2)
    return dataclasses.replace(a, grant=grant(w.kit, v2, "device-2", stranger))


def replayed_grant(w: World, v2: Published) -> Assignment:
    # A grant made for this node but for another node id (replayed from device-2's check-in).
    a = w.assign(v2)
    return dataclasses.replace(a, grant=grant(w.kit, v2, "device-2", w.node.keys.agreement_public))


def tampered_grant(w: World, v2: Published) -> Assignment:
    a = w.assign(v2)
    wrapped = bytearray(a.grant.wrapped_key)
    wrapped[3] ^= 0x01
    return dataclasses.replace(a, grant=dataclasses.replace(a.grant, wrapped_key=bytes(wrapped)))


def other_target_grant(w: World, v2: Published) -> Assignment:
    key = w.kit.registry.database.content_key(v2.key_id)
    made = wrap_key(key, w.node.keys.agreement_public, w.node.node_id, w.v1.target_path, v2.key_id)
    return dataclasses.replace(w.assign(v2), grant=made)


def other_key_grant(w: World, v2: Published) -> Assignment:
    # The content key of version 1, wrapped properly, presented for version 2.
    return dataclasses.replace(w.assign(v2), grant=grant(w.kit, w.v1, w.node.node_id, w.node.keys.agreement_public))


Case = tuple[dict[str, Any], Callable[[World, Published], Assignment] | None, str, bool]

REFUSALS: dict[str, Case] = {
    "golden-vector mismatch": ({"golden_seed": 99}, None, "failed its golden vectors", True),
    "footprint over signed": ({"peak_bytes": 4 * MB}, None, "more than its signed peak", True),
    "memory profile does not fit": ({"peak_bytes": 1 << 40}, None, "more than this node's budget", False),
    "hardware class": ({"hardware_classes": ("gpu-h100",)}, None, "signed for hardware classes gpu-h100", False),
    "onnxruntime too old": ({"min_onnxruntime": "99.1"}, None, "needs onnxruntime 99.1 or later", False),
    "grant for another node": ({}, other_node_grant, "does not open for node device-1", True),
    "grant replayed from another node id": ({}, replayed_grant, "does not open for node device-1", True),
    "tampered wrapped key": ({}, tampered_grant, "does not open for node device-1", True),
    "grant for another target": ({}, other_target_grant, "does not open for node device-1", True),
    "grant for another key": ({}, other_key_grant, "the key grant is for key", False),
    "wrong plaintext hash": ({"plaintext_seed": 7}, None, "not the signed", True),
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
async def test_a_version_that_fails_a_check_is_refused_and_the_previous_one_serves(world: World, case: str) -> None:
    options, make, reason, downloads = REFUSALS[case]
    rss = world.node.cache.loader._rss
    assert isinstance(rss, GrowingRss)
    if case == "footprint over signed":
        rss.gain = 400 * MB  # what onnxruntime really took, far above the 4 MB signed
    v2 = publish_real(world.kit, version="2", seed=2, **options)
    a = make(world, v2) if make else world.assign(v2)

    [row] = await apply(world.node, a)

    assert (row.version, row.state, assigned_version(world.node, "lm")) == ("1", "refused", "2")
    assert reason in row.last_error
    assert serving_versions(world.node, "lm") == ["1"]
    assert np.allclose(await answer(world.node), answers_of(world.v1))
    # Nothing of the refused version is kept: not in the store, not in staging.
    assert [v.version for v in world.node.store.all("lm")] == ["1"]
    assert staged_blob(world.node, v2, world.kit) == []
    blob_requests = sum(n for p, n in world.source.requests.items() if p.startswith("targets/models/lm/2/"))
    assert (blob_requests > 0) is downloads  # the gates refuse before a byte of the blob is fetched
    # Not tried again until the assignment changes.
    before = sum(world.source.requests.values())
    [again] = await apply(world.node, a)
    assert (again.state, sum(world.source.requests.values())) == ("refused", before)
    # A new assignment is tried.
    v3 = publish_real(world.kit, version="3", seed=3)
    rss.gain = 0
    [fixed] = await apply(world.node, world.assign(v3))
    assert (fixed.version, fixed.state, fixed.last_error) == ("3", "committed", "")


async def test_an_upstream_that_is_down_delays_the_update_and_the_node_keeps_serving(world: World) -> None:
    v2 = publish_real(world.kit, version="2", seed=2)
    world.source.down = True
    [row] = await apply(world.node, world.assign(v2))
    assert (row.version, row.state, assigned_version(world.node, "lm")) == ("1", "assigned", "2")
    assert "unavailable" in row.last_error
    assert np.allclose(await answer(world.node), answers_of(world.v1))
    world.source.down = False
    [row] = await apply(world.node, world.assign(v2))
    assert (row.version, row.state, row.last_error) == ("2", "committed", "")


async def test_retries_wait_for_their_backoff(world: World) -> None:
    from services.updates.updater import Backoff

    v2 = publish_real(world.kit, version="2", seed=2)
    now = [0.0]
    node = world.node
    node.updater._backoff = Backoff(initial_s=10.0, max_s=60.0)
    node.updater._clock = lambda: now[0]
    world.source.down = True
    await apply(node, world.assign(v2))
    asked = sum(world.source.requests.values())
    await apply(node, world.assign(v2))
    assert sum(world.source.requests.values()) == asked  # within the backoff: not tried
    world.source.down = False
    now[0] += 10.0
    [row] = await apply(node, world.assign(v2))
    assert (row.version, row.state) == ("2", "committed")


async def test_expired_metadata_blocks_installs_but_never_serving(world: World, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from tests.support.registry import FakeClock

    # A registry whose metadata expired long ago (its clock was in the past when it signed).
    clock = FakeClock(datetime.now(UTC) - timedelta(days=3650))
    stale = new_registry(tmp_path / "stale", clock)
    v1 = publish_real(stale, version="1", seed=1)
    node = world.build(tmp_path / "stale-node", node_id="device-9")
    source = DirectorySource(stale.registry.repository_dir)
    node.fetcher = type(node.fetcher)(source, stale.registry.repository.trusted_root(), node.state / "tuf2", "stale")
    node.updater.fetcher = node.fetcher
    [row] = await apply(node, assignment(stale, v1, node.node_id, node.keys.agreement_public))
    assert (row.version, row.state) == ("", "assigned")
    assert "expired" in row.last_error
    # The node that already serves keeps serving whatever the metadata does.
    assert np.allclose(await answer(world.node), answers_of(world.v1))


async def test_the_updater_refuses_a_cache_that_reads_plaintext(world: World, tmp_path: Path) -> None:
    from services.engine.batcher import BatchingConfig
    from services.engine.model_cache import ModelCache
    from services.engine.model_repository import ModelRepository
    from services.engine.run_pool import RunPool
    from services.errors import ConfigError
    from services.updates.updater import Updater

    pool = RunPool(1)
    try:
        plain = ModelCache(ModelRepository(tmp_path / "plain"), pool, BatchingConfig(), 1 << 30)
        with pytest.raises(ConfigError, match="installed store"):
            Updater(
                "d",
                world.node.keys,
                world.node.fetcher,
                world.node.store,
                plain,
                1 << 30,
                "cpu",
                "1.0",
                lambda: 1 << 40,
            )
    finally:
        pool.close()


async def test_a_committed_version_that_no_longer_decrypts_as_signed_is_reverted_at_start(world: World) -> None:
    v2 = publish_real(world.kit, version="2", seed=2)
    await apply(world.node, world.assign(v2))
    await world.node.close()
    world.nodes.remove(world.node)
    blob = world.node.state / "installed" / "lm" / "2" / "model.ecm"
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF  # bit rot
    blob.write_bytes(bytes(data))

    restarted = world.build()
    [row] = await restarted.updater.recover()
    assert row.version == "1"
    assert serving_versions(restarted, "lm") == ["1"]
    assert np.allclose(await answer(restarted), answers_of(world.v1))


def test_entries_come_from_the_signed_facts(world: World) -> None:
    entry: ModelEntry = world.node.cache.repository.resolve("lm")
    assert (entry.version, entry.task, entry.max_batch_size) == ("1", "char-lm", 8)
    assert "edgecascade.vocab" in entry.properties
    assert entry.properties["edgecascade.peak_memory_bytes"] == str(12 * MB)
    assert InstalledStore(world.node.store.root).committed("lm") is not None


async def test_the_updater_is_what_the_check_in_loop_drives(world: World) -> None:
    target: UpdateTarget = world.node.updater  # mypy checks the protocol; the loop applies AssignedVariants
    a = world.assign(publish_real(world.kit, version="2", seed=2))
    await target.apply([AssignedVariant(a.name, a.version, a.variant, a.target_path, a.grant)])
    assert target.installed() == [InstalledModel("lm", "2", "fp32", "committed", "")]


async def test_an_assignment_of_the_previous_version_rolls_back_to_the_kept_copy_without_a_download(
    world: World,
) -> None:
    v2 = publish_real(world.kit, version="2", seed=2)
    await apply(world.node, world.assign(v2))
    assert serving_versions(world.node, "lm") == ["2"]
    blob_requests = sum(n for p, n in world.source.requests.items() if p.startswith("targets/models/lm/1/"))

    # A rollout rolled back: the region assigns version 1 again; a full disk does not stop it.
    world.node.updater._free_disk = lambda: 0
    [row] = await apply(world.node, world.assign(world.v1))

    assert (row.version, row.state, row.last_error) == ("1", "committed", "")
    assert serving_versions(world.node, "lm") == ["1"]
    assert np.allclose(await answer(world.node), answers_of(world.v1))
    assert sum(n for p, n in world.source.requests.items() if p.startswith("targets/models/lm/1/")) == blob_requests
    store = world.node.store
    assert (store.committed("lm").version, store.previous("lm").version) == ("1", "2")  # type: ignore[union-attr]
    # And forward again, to the version now kept as the previous one.
    world.node.updater._free_disk = lambda: 1 << 40
    [row] = await apply(world.node, world.assign(v2))
    assert (row.version, row.state, serving_versions(world.node, "lm")) == ("2", "committed", ["2"])
