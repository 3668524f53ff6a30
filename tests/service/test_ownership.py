"""The workers' KServe sequence owner table (`service.server.ownership`): one file, mapped by every worker.

Without a server: two views of one table stand for two workers (and one view lives in another process, to
show that the table really is shared memory). Removals shift later entries of a probe chain back; every other
entry must stay findable through that, claims beyond 3/4 of the slots are refused with RESOURCE_EXHAUSTED,
and a replacement worker can forget its predecessor's sequences at once.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from service.errors import ResourceExhausted
from service.server.ownership import OwnerTable, create_table, sequence_hash


def _claim_in_another_process(path: str, me: int, fps: list[int]) -> None:
    table = OwnerTable(Path(path), me)
    for fp in fps:
        table.claim(fp)
    table.close()


@pytest.fixture
def tables(tmp_path):
    path = tmp_path / "owners"
    create_table(path, 64)
    views = [OwnerTable(path, k) for k in range(3)]
    yield views
    for v in views:
        v.close()


def test_fingerprints_tell_tenants_models_and_id_types_apart():
    fps = {
        sequence_hash("acme", "m", 5),
        sequence_hash("acme", "m", "5"),
        sequence_hash("other", "m", 5),
        sequence_hash("acme", "n", 5),
    }
    assert len(fps) == 4 and all(0 < fp < 1 << 56 for fp in fps)
    assert sequence_hash("acme", "m", 5) == sequence_hash("acme", "m", 5)  # stable across processes


def test_claim_release_and_restart_elsewhere(tables, tmp_path):
    w0, w1, _ = tables
    fp = sequence_hash("t", "m", 7)
    assert w1.owner(fp) is None
    assert w0.claim(fp)[0] is None  # START on worker 0
    assert w1.owner(fp) == 0 and w0.owner(fp) == 0
    held, slot = w0.holds(fp, -1)
    assert held
    assert w1.claim(fp)[0] == 0  # restarted on worker 1: worker 0 learns it no longer owns it
    assert w0.holds(fp, slot) == (False, slot)
    w0.release(fp)  # worker 0 retiring its old incarnation leaves worker 1's claim alone
    assert w0.owner(fp) == 1
    w1.release(fp)  # END on worker 1
    assert w0.owner(fp) is None
    # A claim made in another process is seen here at once (the file is shared memory).
    fps = [sequence_hash("t", "m", i) for i in range(20)]
    proc = mp.get_context("spawn").Process(target=_claim_in_another_process, args=(str(w0.path), 2, fps))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert {w0.owner(fp) for fp in fps} == {2}


def test_removal_keeps_every_other_entry_of_a_chain_findable(tables):
    w0, w1, w2 = tables
    mask = w0.slots - 1
    # Fingerprints with the same home slot (and a few with the next one) make one long probe chain.
    same_home = [(i << 20) | 5 for i in range(1, 9)] + [(i << 20) | 6 for i in range(1, 5)]
    for n, fp in enumerate(same_home):
        (w0, w1, w2)[n % 3].claim(fp)
    assert all(fp & mask in (5, 6) for fp in same_home)
    for gone in same_home[::3]:
        (w0, w1, w2)[same_home.index(gone) % 3].release(gone)
        for n, fp in enumerate(same_home):
            want = None if fp in same_home[: same_home.index(gone) + 1 : 3] else n % 3
            assert w1.owner(fp) == want, (hex(fp), want)
    left = [fp for fp in same_home if fp not in same_home[::3]]
    for fp in left:
        held, _slot = (w0, w1, w2)[same_home.index(fp) % 3].holds(fp, -1)
        assert held


def test_a_full_table_refuses_new_sequences_and_a_replacement_forgets_its_predecessors(tables):
    w0, w1, _ = tables
    fps = [sequence_hash("t", "m", i) for i in range(48)]  # 3/4 of 64 slots
    for i, fp in enumerate(fps):
        (w0 if i % 2 else w1).claim(fp)
    with pytest.raises(ResourceExhausted, match="owner table is full"):
        w0.claim(sequence_hash("t", "m", "one too many"))
    assert w0.claim(fps[0])[0] == 1  # a restart of a live sequence still claims its own slot
    assert w1.release_all(0) == 25  # worker 0 was replaced (no shared store): its 24 + 1 sequences are gone
    assert all(w1.owner(fp) == 1 for i, fp in enumerate(fps) if i % 2 == 0 and i)
    assert all(w1.owner(fp) is None for i, fp in enumerate(fps) if i % 2 or i == 0)
    w0.claim(sequence_hash("t", "m", "one too many"))  # room again
