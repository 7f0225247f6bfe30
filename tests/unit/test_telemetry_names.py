"""The names nodes export are the names the region reads (services/ may not import the region; the test may)."""

from __future__ import annotations

from services import telemetry_names
from tier2_region.fleet import figures
from tier2_region.telemetry import admission


def _constants(module: object) -> dict[str, str]:
    return {k: v for k, v in vars(module).items() if k.isupper() and isinstance(v, str)}


def test_every_name_the_region_reads_is_exported_with_the_same_value() -> None:
    exported = _constants(telemetry_names)
    read = _constants(figures)
    assert read, "figures.py names no metric or attribute"
    assert {k: exported.get(k) for k in read} == read


def test_the_update_state_and_the_outcomes_match_what_the_region_files_them_under() -> None:
    assert telemetry_names.UPDATE_STATE == admission.UPDATE_STATE
    assert telemetry_names.OUTCOMES == ("ok", "error", "forwarded", "rejected")


def test_the_stand_ins_cannot_be_a_model_name_or_a_version() -> None:
    from services.engine.model_repository import _NAME, _is_version

    for stand_in in (telemetry_names.OTHER, telemetry_names.UNRESOLVED):
        assert not _NAME.fullmatch(stand_in) and not _is_version(stand_in)
