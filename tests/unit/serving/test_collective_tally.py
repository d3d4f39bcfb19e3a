"""CollectiveTally: what a rank's communicator records, ships and merges (maia_serving.serving.collectives)."""

import pytest

from maia_serving.serving.collectives import CollectiveTally, op_name


def test_calls_of_one_kind_are_counted_in_one_row():
    tally = CollectiveTally()
    for _ in range(5):
        tally.record("all_reduce", 2, 9472)
    tally.record("all_gather", 2, 4096)
    tally.record("send", 2, 18944, stage=1)
    assert sorted(tally.rows()) == [(0, 2, 9472, 5, 0), (1, 2, 4096, 1, 0), (4, 2, 18944, 1, 1)]
    assert [op_name(r) for r in sorted(tally.rows())] == ["all_reduce", "all_gather", "send"]


def test_take_empties_and_merge_adds_a_relayed_tally():
    upstream, last = CollectiveTally(), CollectiveTally()
    upstream.record("all_reduce", 2, 100)
    upstream.record("send", 2, 400)
    last.record("all_reduce", 2, 100)
    last.merge(upstream.take())
    assert upstream.rows() == []
    assert sorted(last.take()) == [(0, 2, 100, 2, 0), (4, 2, 400, 1, 0)]
    assert last.rows() == []


@pytest.mark.parametrize(
    "row", [(9, 2, 100, 1, 0), (0, 0, 100, 1, 0), (0, 2, -1, 1, 0), (0, 2, 100, 0, 0), (0, 2, 100, 1, -1), (0, 2, 100)]
)
def test_a_malformed_relayed_row_is_refused(row):
    with pytest.raises(ValueError):
        CollectiveTally().merge([row])


def test_an_unknown_collective_is_refused_by_name():
    with pytest.raises(KeyError, match="all_to_all"):
        CollectiveTally().record("all_to_all", 2, 100)
