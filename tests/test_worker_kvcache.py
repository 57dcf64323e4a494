"""KV cache slabs in-process: growth, rollback, commit of a tree path, budget, idle eviction."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cosine.protocol import ProtocolError
from cosine.workers.kvcache import KVCache

L, H, D = 2, 2, 4


def rows(start: int, n: int) -> list[np.ndarray]:
    """Per-layer heads-major rows [H, n, D] whose values encode (layer, token index) so
    copies can be traced."""
    return [np.broadcast_to((layer * 1000 + np.arange(start, start + n, dtype=np.float32))[None, :, None],
                            (H, n, D)).copy() for layer in range(L)]


def test_append_grows_in_chunks_and_keeps_rows() -> None:
    c = KVCache(L, H, D, np.float32, budget_tokens=1000, chunk_tokens=4)
    e = c.create("r")
    for i in range(0, 11, 1):
        c.append(e, rows(i, 1), rows(i, 1))
    assert e.length == 11 and e.capacity >= 11 and e.capacity % 4 == 0
    k, v = e.past(1)
    assert k.shape == (H, 11, D)
    np.testing.assert_array_equal(k[0, :, 0], 1000 + np.arange(11))
    # the slab beyond the rows is zero, so an engine may attend over it under a mask
    assert e.k[1].flags.c_contiguous and not e.k[1][:, 11:].any()
    c.truncate(e, 5)
    assert e.length == 5 and c.used == 5
    with pytest.raises(ProtocolError, match="bad_request"):
        c.truncate(e, 6)


def test_commit_copies_accepted_rows_in_order() -> None:
    c = KVCache(L, H, D, np.float32, budget_tokens=1000)
    e = c.create("r")
    c.append(e, rows(0, 3), rows(0, 3))
    parents = np.array([-1, 0, 1, 0, 3, 1])
    c.set_pending(e, parents, rows(100, 6), rows(200, 6))
    assert c.used == 9
    c.commit(e, [0, 1, 5])
    assert e.length == 6 and e.pending is None and c.used == 6
    k, v = e.past(0)
    np.testing.assert_array_equal(k[0, :, 0], [0, 1, 2, 100, 101, 105])
    np.testing.assert_array_equal(v[1, :, 3], [0, 1, 2, 200, 201, 205])
    with pytest.raises(ProtocolError, match="without a pending"):
        c.commit(e, [0])
    c.set_pending(e, parents, rows(100, 6), rows(200, 6))
    for bad in ([1], [0, 2], [0, 1, 1], [], [0, 9]):
        with pytest.raises(ProtocolError, match="bad_request"):
            c.commit(e, bad)
    assert e.length == 6 and e.pending is not None


def test_budget_is_checked_with_nothing_changed() -> None:
    c = KVCache(L, H, D, np.float32, budget_tokens=10)
    a = c.create("a")
    c.append(a, rows(0, 8), rows(0, 8))
    with pytest.raises(ProtocolError) as err:
        c.append(a, rows(8, 3), rows(8, 3))
    assert err.value.code == "capacity" and a.length == 8
    with pytest.raises(ProtocolError, match="capacity"):
        c.set_pending(a, np.array([-1, 0, 1]), rows(0, 3), rows(0, 3))
    assert a.pending is None
    c.append(a, rows(8, 2), rows(8, 2))
    assert c.used == 10
    with pytest.raises(ProtocolError, match="duplicate_request"):
        c.create("a")
    with pytest.raises(ProtocolError, match="unknown_request"):
        c.get("b")


def test_idle_eviction_logs_rid(caplog: pytest.LogCaptureFixture) -> None:
    c = KVCache(L, H, D, np.float32, budget_tokens=100)
    old, new = c.create("old"), c.create("new")
    old.last_used -= 100
    with caplog.at_level(logging.WARNING, logger="cosine.worker.kvcache"):
        assert c.evict_idle(10.0) == ["old"]
    assert "old" not in c and "new" in c and c.freed_idle == 1
    assert "'old'" in caplog.text and "idle" in caplog.text
