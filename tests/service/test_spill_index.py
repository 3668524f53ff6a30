"""SpillIndex: the flat hash table of spilled sessions (no server)."""

from __future__ import annotations

import numpy as np

from service.core.sessions import new_session_id
from service.core.spill_index import SpillIndex, key_of


def test_put_get_pop_through_growth_and_shrink():
    index = SpillIndex()
    ids = [new_session_id() for _ in range(50_000)]
    for n, sid in enumerate(ids):
        assert index.put(sid, n)
    assert len(index) == len(ids) and index.nbytes >= 2 * 16 * len(ids)  # load factor at most one half
    assert all(index.get(sid) == n for n, sid in enumerate(ids))
    assert index.get("never-spilled") is None and "never-spilled" not in index
    assert not index.put(ids[7], 99) and index.get(ids[7]) == 7  # a taken key is refused, not overwritten
    for n, sid in enumerate(ids[:49_900]):
        assert index.pop(sid) == n
    assert index.pop(ids[0]) is None and ids[0] not in index
    assert len(index) == 100 and index.nbytes <= 16 * 1024  # drained: the arrays shrank back
    assert all(index.get(sid) == 49_900 + n for n, sid in enumerate(ids[49_900:]))


def test_keys_are_never_the_empty_or_deleted_marker():
    keys = np.array([key_of(new_session_id()) for _ in range(10_000)], dtype=np.uint64)
    assert (keys > 1).all() and len(np.unique(keys)) == len(keys)
