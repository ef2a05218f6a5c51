"""Routing: set for a block of passes, checked before any compute, always reset."""

from __future__ import annotations

import pytest

from qlora.layer import Routing, Segment


def test_route_sets_the_segments_for_the_block_and_resets_them_even_on_error():
    routing = Routing()
    segments = [Segment("a", 0, 2), Segment("b", 2, 5)]
    with routing.route(segments):
        assert routing.segments == segments
    assert routing.segments == []
    with pytest.raises(KeyError), routing.route(segments):
        raise KeyError("a pass failed")
    assert routing.segments == []


@pytest.mark.parametrize("segments", [
    [Segment("a", 1, 3)],  # does not start at row 0
    [Segment("a", 0, 2), Segment("b", 3, 4)],  # a gap
    [Segment("a", 0, 2), Segment("b", 2, 2)],  # an empty segment
], ids=["offset", "gap", "empty"])
def test_segments_that_do_not_tile_the_batch_are_refused(segments):
    routing = Routing()
    with pytest.raises(ValueError, match="tile the batch"), routing.route(segments):
        pass
    assert routing.segments == []


def test_routes_cannot_nest():
    routing = Routing()
    with routing.route([Segment("a", 0, 1)]):
        with pytest.raises(RuntimeError, match="already set"), routing.route([Segment("b", 0, 1)]):
            pass
        assert routing.segments == [Segment("a", 0, 1)]
