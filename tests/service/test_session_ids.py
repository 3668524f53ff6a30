"""Session ids: unguessable, and never read as an option by a command line (no leading "-")."""

from __future__ import annotations

from service.core.sessions import new_session_id


def test_session_ids_never_start_with_a_dash():
    ids = [new_session_id() for _ in range(5000)]  # a leading "-" is 1 in 64 per plain token_urlsafe draw
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids) and all(len(i) == 22 for i in ids)  # 16 random bytes, base64url
    assert new_session_id("w1.").startswith("w1.")
