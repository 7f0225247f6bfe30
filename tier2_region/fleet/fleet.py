"""The fleet core: enrollment tokens, enrollment, signed check-ins, deployments and the fleet listing.

Enrollment
    An operator makes a random one-time token (:meth:`Fleet.create_token`);
    the inventory keeps only its SHA-256 and expiry. A node presents it with
    its facts and public keys. In one transaction: a wrong, used or expired
    token is UNAUTHENTICATED; an id enrolled with other keys and not revoked is
    PERMISSION_DENIED; otherwise the node is stored and the token used. A
    refusal stores nothing (the token stays unused). The same id with the same
    keys and a fresh token enrolls again (its facts are updated); a revoked id
    enrolls afresh, with any keys.
Check-in
    The report's fields are checked, then: the node is enrolled and not
    revoked, the Ed25519 signature over the exact report bytes verifies with
    its enrolled identity key, the report's timestamp is within ±``clock_skew_s``
    of the region's clock, and its nonce is new. A nonce is remembered for
    2 × ``clock_skew_s`` (the longest a report carrying it can stay within the
    window after it was first seen), then forgotten. Each failure is
    UNAUTHENTICATED and records nothing. What the node reported is then
    recorded and its desired state returned.
Desired state
    For each model deployed to the node — the deployment matching its tier and
    hardware class; if several of one model match, the most specific (both
    filters over one over none), then the newest — the variant
    :func:`~tier2_region.fleet.assignment.choose_variant` picks, with the
    variant's content key wrapped to the node's X25519 key
    (:func:`~services.updates.key_grants.wrap_key`, bound to the node id,
    target path and key id); a model none of whose variants fits is
    unassigned, with the reason. While a rollout of a model is active, a node
    in its cohort and eligible for it gets the rollout's version instead
    (:mod:`~tier2_region.fleet.rollout`) — except in the rollout's shadow
    phase, when such a node keeps the deployment's version and gets the
    rollout's version as a second assignment of the model, marked ``shadow``
    with the plan's ``shadow_share``, to run beside it; once it has ended, every node gets
    what the deployment names again (the new version after completion, the
    old one after a rollback or abort). A deploy of a model with an active
    rollout is refused: the rollout sets the deployment when it completes.

Every refusal is counted by reason in :attr:`Fleet.refusals`.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.engine.model_repository import check_model_name, check_version
from services.errors import (
    EdgecascadeError,
    InvalidArgumentError,
    ModelNotFoundError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from services.updates.key_grants import wrap_key
from tier2_region.config import FleetSection
from tier2_region.fleet.assignment import VariantOffer, choose_variant
from tier2_region.fleet.catalog import VariantCatalog
from tier2_region.fleet.domain import (
    SIGNATURE_BYTES,
    Assignment,
    DesiredState,
    Enrollment,
    NodeFacts,
    SignedCheckIn,
    Unassigned,
    check_enrollment,
    check_node,
    check_report,
    check_text,
    check_tier,
)
from tier2_region.fleet.inventory import Deployment, Inventory, NodeRecord
from tier2_region.fleet.rollout import Rollout, canary_variant
from tier2_region.fleet.rollout_store import RolloutStore

Clock = Callable[[], float]
TOKEN_BYTES = 32


@dataclass(frozen=True)
class IssuedToken:
    """A new enrollment token: shown once, then only its hash is kept."""

    token: str
    expires_at: float


@dataclass(frozen=True)
class FleetEntry:
    """One node of the fleet listing: what the inventory knows and what is deployed to it."""

    node: NodeRecord
    desired: tuple[Deployment, ...]


class Fleet:
    """The region's fleet.

    Args:
        inventory: Where nodes, tokens, deployments and nonces are kept.
        catalog: The registry's variants and content keys.
        settings: The ``[fleet]`` section (check interval, clock window, token lifetime).
        clock: Unix time in seconds (tests pass a fake one).
    """

    def __init__(
        self, inventory: Inventory, catalog: VariantCatalog, settings: FleetSection, clock: Clock = time.time
    ) -> None:
        self.inventory = inventory
        self.catalog = catalog
        self.settings = settings
        self.clock = clock
        self.refusals: Counter[str] = Counter()
        self.rollouts = RolloutStore(inventory)

    def _refuse(self, reason: str, error: EdgecascadeError) -> EdgecascadeError:
        self.refusals[reason] += 1
        return error

    # Operator

    def create_token(self, ttl_s: float | None = None) -> IssuedToken:
        """Makes a one-time enrollment token valid for ``ttl_s`` seconds (default ``[fleet] token_ttl_s``).

        Raises:
            InvalidArgumentError: ``ttl_s`` is not positive.
        """
        ttl = self.settings.token_ttl_s if ttl_s is None else ttl_s
        if not ttl > 0:
            raise InvalidArgumentError(f"a token's lifetime must be a positive number of seconds, got {ttl}")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = self.clock()
        self.inventory.add_token(token, now, now + ttl)
        return IssuedToken(token, now + ttl)

    def revoke(self, node_id: str) -> None:
        """Revokes a node: its check-ins are refused until it enrolls again (with a new token).

        Raises:
            InvalidArgumentError: The id is not valid.
            NotFoundError: No node has this id.
        """
        self.inventory.revoke(check_node(node_id))

    def deploy(self, name: str, version: str, tier: str = "", hardware_class: str = "") -> Deployment | None:
        """Sets the desired version of a model for the nodes of ``tier`` and ``hardware_class`` ("" = any).

        A newer deploy of the same model with the same filters replaces the older one.

        Returns:
            The deployment it replaced, or None.

        Raises:
            InvalidArgumentError: A name, version, tier or class is not valid.
            ModelNotFoundError: The registry has no variant of this model version.
            PreconditionError: A rollout of the model is active.
        """
        check_model_name(name)
        check_version(version)
        if tier:
            check_tier(tier)
        check_text(hardware_class, "hardware class")
        active = self.rollouts.active(name)
        if active:
            rollout = active[0]
            raise PreconditionError(
                f"a rollout of '{name}' to version {rollout.version} is {rollout.state} ({rollout.label}); it sets "
                f"the deployment when it completes. End it first: edgecascade rollout abort {name} (back to "
                f"version {rollout.baseline}) or edgecascade rollout promote {name}"
            )
        if not self.catalog.offers(name, version):
            raise ModelNotFoundError(
                f"the registry has no model '{name}' version {version}; publish it first (edgecascade model publish)"
            )
        return self.inventory.deploy(Deployment(name, version, tier, hardware_class, self.clock()))

    def listing(self) -> list[FleetEntry]:
        """Every node with the deployments that apply to it."""
        deployments = self.inventory.deployments()
        return [FleetEntry(node, applicable(node.facts, deployments)) for node in self.inventory.nodes()]

    # Nodes

    def enroll(self, request: Enrollment) -> int:
        """Enrolls a node with a one-time token.

        Returns:
            The check interval the node should keep, in seconds.

        Raises:
            InvalidArgumentError: A field is not valid.
            UnauthenticatedError: The token is wrong, used or expired.
            PermissionDeniedError: The id is enrolled with other keys and not revoked.
        """
        try:
            check_enrollment(request)
        except InvalidArgumentError as exc:
            raise self._refuse("invalid_enrollment", exc) from None
        facts = request.facts
        now = self.clock()
        with self.inventory.transaction() as db:
            token = Inventory.token(db, request.token) if request.token else None
            if token is None:
                raise self._refuse(
                    "token_unknown",
                    UnauthenticatedError(
                        "the enrollment token is not valid; ask the operator for one (edgecascade fleet token)"
                    ),
                )
            if token.used_at is not None:
                raise self._refuse(
                    "token_used",
                    UnauthenticatedError("the enrollment token was used already; a token enrolls one node once"),
                )
            if now >= token.expires_at:
                raise self._refuse(
                    "token_expired",
                    UnauthenticatedError("the enrollment token has expired; ask the operator for a new one"),
                )
            existing = Inventory.node_in(db, facts.node_id)
            same_keys = existing is not None and (
                existing.identity_public_key == request.identity_public_key
                and existing.agreement_public_key == request.agreement_public_key
            )
            if existing is not None and not existing.revoked and not same_keys:
                raise self._refuse(
                    "node_id_taken",
                    PermissionDeniedError(
                        f"node {facts.node_id} is enrolled with other keys; an operator must revoke it first "
                        f"(edgecascade fleet revoke {facts.node_id})"
                    ),
                )
            keep = existing is not None and not existing.revoked
            Inventory.put_node(db, facts, request.identity_public_key, request.agreement_public_key, now, keep=keep)
            Inventory.use_token(db, request.token, facts.node_id, now)
        return self.settings.check_interval_s

    def check_in(self, signed: SignedCheckIn) -> DesiredState:
        """Verifies a signed check-in, records what it reports and answers the node's desired state.

        Raises:
            InvalidArgumentError: A field of the report is not valid.
            UnauthenticatedError: The node is unknown or revoked, the signature does not
                verify, the timestamp is outside the clock window, or the nonce was seen.
        """
        report = signed.report
        try:
            check_report(report)
        except InvalidArgumentError as exc:
            raise self._refuse("invalid_report", exc) from None
        node_id = report.facts.node_id
        node = self.inventory.node(node_id)
        if node is None:
            raise self._refuse(
                "unknown_node", UnauthenticatedError(f"node {node_id} is not enrolled; enroll it with a token first")
            )
        if node.revoked:
            raise self._refuse(
                "revoked_node",
                UnauthenticatedError(f"node {node_id} is revoked; it must enroll again with a new token"),
            )
        if not _signed_by(node.identity_public_key, signed):
            raise self._refuse(
                "bad_signature",
                UnauthenticatedError(f"the check-in of node {node_id} is not signed by its enrolled identity key"),
            )
        now = self.clock()
        skew = report.timestamp_unix_ms / 1000 - now
        window = self.settings.clock_skew_s
        if abs(skew) > window:
            raise self._refuse(
                "stale_timestamp",
                UnauthenticatedError(
                    f"the check-in of node {node_id} is timed {abs(skew):.0f} s "
                    f"{'ahead of' if skew > 0 else 'behind'} the region's clock; at most {window} s is accepted "
                    "(check the node's clock)"
                ),
            )
        with self.inventory.transaction() as db:
            current = Inventory.node_in(db, node_id)
            if current is None or current.revoked or current.identity_public_key != node.identity_public_key:
                # Revoked (or enrolled again) between the checks above and now.
                raise self._refuse("revoked_node", UnauthenticatedError(f"node {node_id} is revoked or enrolled again"))
            if not Inventory.remember_nonce(db, node_id, report.nonce, now, now - 2 * window):
                raise self._refuse(
                    "replayed_nonce",
                    UnauthenticatedError(f"the check-in of node {node_id} reuses a nonce: a replay, refused"),
                )
            Inventory.record_check_in(db, report.facts, report.installed, now)
        return self.desired_state(report.facts, node.agreement_public_key)

    def desired_state(self, facts: NodeFacts, agreement_public_key: bytes) -> DesiredState:
        """What a node with these facts should run, with each variant's key wrapped to ``agreement_public_key``."""
        assignments: list[Assignment] = []
        unassigned: list[Unassigned] = []
        rollouts = {r.name: r for r in self.rollouts.active()}
        for deployment in applicable(facts, self.inventory.deployments()):
            name = deployment.name
            version, offers = self._target(facts, deployment, rollouts.get(name))
            if not offers:
                unassigned.append(Unassigned(name, version, f"model '{name}' version {version} is not in the registry"))
                continue
            choice = choose_variant(facts, offers)
            if isinstance(choice, str):
                unassigned.append(Unassigned(name, version, choice))
                continue
            assignments.append(self._assign(facts, agreement_public_key, name, version, choice))
            shadow = self._shadow(facts, deployment, rollouts.get(name))
            if shadow is not None:
                rollout, offer = shadow
                assigned = self._assign(facts, agreement_public_key, name, rollout.version, offer)
                assignments.append(replace(assigned, shadow=True, shadow_share=rollout.plan.shadow_share))
        return DesiredState(tuple(assignments), tuple(unassigned), self.settings.check_interval_s)

    def _assign(
        self, facts: NodeFacts, agreement_public_key: bytes, name: str, version: str, offer: VariantOffer
    ) -> Assignment:
        key = self.catalog.content_key(offer.key_id)
        grant = wrap_key(key, agreement_public_key, facts.node_id, offer.target_path, offer.key_id)
        return Assignment(name, version, offer.variant, offer.target_path, grant)

    def _shadow(
        self, facts: NodeFacts, deployment: Deployment, rollout: Rollout | None
    ) -> tuple[Rollout, VariantOffer] | None:
        """The rollout and variant a node runs as a shadow of a deployed model, if it is in a shadow cohort."""
        if rollout is None or not rollout.shadow or not rollout.covers(facts.node_id):
            return None
        offer = canary_variant(rollout, facts, deployment, self.catalog.offers(rollout.name, rollout.version))
        return None if offer is None else (rollout, offer)

    def _target(
        self, facts: NodeFacts, deployment: Deployment, rollout: Rollout | None
    ) -> tuple[str, list[VariantOffer]]:
        """The version a node serves of a deployed model, with that version's variants."""
        if rollout is not None and not rollout.shadow and rollout.covers(facts.node_id):
            offers = self.catalog.offers(rollout.name, rollout.version)
            if canary_variant(rollout, facts, deployment, offers) is not None:
                return rollout.version, offers
        return deployment.version, self.catalog.offers(deployment.name, deployment.version)


def _signed_by(identity_public_key: bytes, signed: SignedCheckIn) -> bool:
    if len(signed.signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(identity_public_key).verify(signed.signature, signed.report_bytes)
    except (InvalidSignature, ValueError):
        return False
    return True


def applicable(facts: NodeFacts, deployments: list[Deployment]) -> tuple[Deployment, ...]:
    """The deployment of each model that applies to a node: the most specific matching one, then the newest."""
    chosen: dict[str, Deployment] = {}
    for deployment in deployments:
        if not deployment.matches(facts):
            continue
        current = chosen.get(deployment.name)
        if current is None or (deployment.specificity, deployment.created_at) > (
            current.specificity,
            current.created_at,
        ):
            chosen[deployment.name] = deployment
    return tuple(chosen[name] for name in sorted(chosen))
