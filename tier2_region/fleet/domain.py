"""What a node says about itself at enrollment and check-in, and what it gets back.

Every field a node sends is checked here before anything reads it further:
:func:`check_facts`, :func:`check_enrollment` and :func:`check_report` raise
:class:`~services.errors.InvalidArgumentError` naming the field and what would
be accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from services.errors import ConfigError, InvalidArgumentError
from services.tier_config import check_node_id
from services.updates.checkin import AssignedVariant as Assignment
from services.updates.checkin import DesiredState, InstalledModel, NodeFacts, Unassigned

# The check-in types are the shared ones (a node builds them, the region reads them).
__all__ = [
    "Assignment",
    "CheckInReport",
    "DesiredState",
    "Enrollment",
    "InstalledModel",
    "NodeFacts",
    "SignedCheckIn",
    "Unassigned",
]

# The tiers that enroll (the region is the one they enroll with).
TIERS = ("device", "edge")
# The states an installed model's update can be in (the updater's journal), or "" when it reports none.
UPDATE_STATES = ("assigned", "downloading", "verified", "trial", "committed", "refused")
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 16
MAX_TEXT = 256
MAX_ERROR_TEXT = 1024
MAX_INSTALLED = 256
# SQLite integers are signed 64-bit.
MAX_BYTES_VALUE = 2**63 - 1


@dataclass(frozen=True)
class Enrollment:
    """An enrollment request: a one-time token, the node's facts and its raw public keys."""

    token: str
    facts: NodeFacts
    identity_public_key: bytes
    agreement_public_key: bytes


@dataclass(frozen=True)
class CheckInReport:
    """What a node signs at check-in (the fields of the ``CheckInReport`` message)."""

    facts: NodeFacts
    timestamp_unix_ms: int
    nonce: bytes
    installed: tuple[InstalledModel, ...] = ()


@dataclass(frozen=True)
class SignedCheckIn:
    """A check-in as received: the exact bytes that were signed, the signature, and those bytes decoded."""

    report_bytes: bytes
    signature: bytes
    report: CheckInReport


def check_text(value: str, what: str, limit: int = MAX_TEXT, *, required: bool = False) -> str:
    """Returns ``value`` if it is at most ``limit`` printable characters (and not empty, if ``required``).

    Raises:
        InvalidArgumentError: It is not.
    """
    if required and not value:
        raise InvalidArgumentError(f"{what} is empty; it is required")
    if len(value) > limit:
        raise InvalidArgumentError(f"{what} is {len(value)} characters long; at most {limit} are accepted")
    if not value.isprintable():
        raise InvalidArgumentError(f"{what} contains control characters; use printable text")
    return value


def check_node(node_id: str) -> str:
    """Returns ``node_id`` if it is a valid node id.

    Raises:
        InvalidArgumentError: It is not 1-128 ASCII letters, digits, '_', '.' or '-' starting with a letter or digit.
    """
    try:
        return check_node_id(node_id)
    except ConfigError:
        raise InvalidArgumentError(
            f"node id {node_id[:MAX_TEXT]!r} is not valid: use 1-128 ASCII letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        ) from None


def check_tier(tier: str) -> str:
    """Returns ``tier`` if nodes of it enroll (``device`` or ``edge``).

    Raises:
        InvalidArgumentError: It is another tier or none.
    """
    if tier not in TIERS:
        raise InvalidArgumentError(f"tier {tier or '(unspecified)'!r} is not valid: a node is a device or an edge")
    return tier


def _check_count(value: int, what: str) -> int:
    if not 0 <= value <= MAX_BYTES_VALUE:
        raise InvalidArgumentError(f"{what} must be between 0 and {MAX_BYTES_VALUE}, got {value}")
    return value


def check_facts(facts: NodeFacts) -> NodeFacts:
    """Returns ``facts`` if every field is valid.

    Raises:
        InvalidArgumentError: A field is not.
    """
    check_node(facts.node_id)
    check_tier(facts.tier)
    check_text(facts.hardware_class, "hardware_class")
    _check_count(facts.memory_budget_bytes, "memory_budget_bytes")
    _check_count(facts.free_disk_bytes, "free_disk_bytes")
    check_text(facts.onnxruntime_version, "onnxruntime_version")
    return facts


def check_enrollment(request: Enrollment) -> Enrollment:
    """Returns ``request`` if its facts and keys are valid (the token is checked against the inventory).

    Raises:
        InvalidArgumentError: A fact or key is not valid, or the token is too long.
    """
    check_text(request.token, "token")
    check_facts(request.facts)
    for what, key, kind in (
        ("identity_public_key", request.identity_public_key, "Ed25519"),
        ("agreement_public_key", request.agreement_public_key, "X25519"),
    ):
        if len(key) != PUBLIC_KEY_BYTES:
            raise InvalidArgumentError(
                f"{what} must be a raw {kind} public key of {PUBLIC_KEY_BYTES} bytes, got {len(key)} bytes"
            )
    try:
        Ed25519PublicKey.from_public_bytes(request.identity_public_key)
        X25519PublicKey.from_public_bytes(request.agreement_public_key)
    except ValueError:
        raise InvalidArgumentError("a public key is not a valid Ed25519 or X25519 key") from None
    return request


def check_report(report: CheckInReport) -> CheckInReport:
    """Returns ``report`` if its facts, nonce and installed models are valid (signature and time are checked later).

    Raises:
        InvalidArgumentError: A field is not valid, or it lists more than :data:`MAX_INSTALLED` models.
    """
    check_facts(report.facts)
    if len(report.nonce) != NONCE_BYTES:
        raise InvalidArgumentError(f"nonce must be {NONCE_BYTES} random bytes, got {len(report.nonce)}")
    if len(report.installed) > MAX_INSTALLED:
        raise InvalidArgumentError(
            f"the report lists {len(report.installed)} installed models; at most {MAX_INSTALLED} are accepted"
        )
    for i, model in enumerate(report.installed):
        where = f"installed[{i}]"
        check_text(model.name, f"{where}.name", required=True)
        check_text(model.version, f"{where}.version")
        check_text(model.variant, f"{where}.variant")
        check_text(model.last_error, f"{where}.last_error", MAX_ERROR_TEXT)
        if model.state and model.state not in UPDATE_STATES:
            raise InvalidArgumentError(
                f"{where}.state {model.state[:MAX_TEXT]!r} is not valid: use one of {', '.join(UPDATE_STATES)}"
            )
    return report
