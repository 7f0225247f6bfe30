"""A check-in answer comes through the edge, which the node does not trust: its size and interval are bounded."""

from __future__ import annotations

import pytest

from protos.edgecascade.v1 import fleet_pb2 as pb
from services.errors import IntegrityError
from services.rpc.fleet_client import MAX_ASSIGNMENTS, MAX_CHECK_INTERVAL_S, desired_state_from_proto


@pytest.mark.parametrize(("sent", "kept"), [(0, 0), (1, 1), (30, 30), (2**32 - 1, MAX_CHECK_INTERVAL_S)])
def test_the_interval_an_answer_asks_for_is_clamped(sent: int, kept: int) -> None:
    assert desired_state_from_proto(pb.CheckInResponse(check_interval_s=sent)).check_interval_s == kept


@pytest.mark.parametrize("field", ["assignments", "unassigned"])
def test_an_answer_with_more_entries_than_any_region_sends_is_refused(field: str) -> None:
    answer = pb.CheckInResponse()
    for i in range(MAX_ASSIGNMENTS + 1):
        getattr(answer, field).add(name=f"m{i}", version="1")
    with pytest.raises(IntegrityError, match=f"at most {MAX_ASSIGNMENTS}"):
        desired_state_from_proto(answer)
    del getattr(answer, field)[-1]
    assert len(getattr(desired_state_from_proto(answer), field)) == MAX_ASSIGNMENTS
