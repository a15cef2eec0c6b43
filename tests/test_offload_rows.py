"""moesys.offload.rows: the numpy grouping of a host-routed layer's routed rows equals the readable loop, on
random routings (experts absent from every chunk, empty routings, one chunk, many)."""

import random

import numpy as np

from moesys.offload.rows import rows_by_chunk, rows_by_chunk_reference


def test_rows_by_chunk_equals_the_reference():
    rng = random.Random(0)
    for trial in range(300):
        E, K, T = rng.randint(1, 70), rng.randint(1, 8), rng.randint(0, 40)
        flat = [rng.randrange(E) for _ in range(T * K)]
        experts = rng.sample(range(E), rng.randint(1, E))
        n = rng.randint(1, 5)
        chunk_of = {e: i // n for i, e in enumerate(experts)}
        chunks = -(-len(experts) // n)
        want_rows, want_spans = rows_by_chunk_reference(flat, chunk_of, chunks, K)
        rows, spans = rows_by_chunk(np.asarray(flat, dtype=np.int64), chunk_of, chunks, K)
        assert rows.tolist() == want_rows and spans == want_spans, trial
    # a row's top-k position orders it within its chunk: [e0 e1 | e1 e0] -> chunk 0 = {e0, e1}: k=0 rows, k=1 rows
    rows, spans = rows_by_chunk(np.array([0, 1, 1, 0]), {0: 0, 1: 0}, 1, 2)
    assert rows.tolist() == [0, 2, 1, 3] and spans == [(0, 4, [2, 2])]


def test_lookup_maps_keys_and_marks_missing():
    from moesys.offload.rows import lookup

    got = lookup({3: 7, 0: 2, 9: 1}, np.array([9, 3, 3, 4, 0, 11]))
    assert got.dtype == np.int64 and got.tolist() == [1, 7, 7, -1, 2, -1]
    assert lookup({}, np.array([], dtype=np.int64)).tolist() == []
