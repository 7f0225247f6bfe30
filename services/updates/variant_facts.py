"""What the region signs about a model variant, as every tier reads it.

A variant is the TUF target ``models/<name>/<version>/<variant>`` (its encrypted
blob) with golden vectors beside it; its signed ``custom`` field carries the
facts a node needs to decide and to verify (schema :data:`SCHEMA`).
"""

from __future__ import annotations

SCHEMA = "edgecascade.model/1"


def target_path(name: str, version: str, variant: str) -> str:
    """The TUF target path of a model variant's encrypted blob."""
    return f"models/{name}/{version}/{variant}"


def golden_path(name: str, version: str, variant: str) -> str:
    """The TUF target path of a variant's golden vectors."""
    return f"models/{name}/{version}/{variant}.golden.json"
