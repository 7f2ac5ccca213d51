"""The kit's one kNN (neighbours.py) against a one-query-at-a-time loop in float64."""

import numpy as np
import pytest
import torch

from ncis_core.neighbours import kth_nearest, nearest


def _loop(queries: np.ndarray, keys: np.ndarray, k: int):
    """Per query: every squared distance, sorted stably (equal distances: the lower index first)."""
    distances, indices = [], []
    for q in queries.reshape(-1, queries.shape[-1]):
        d = np.array([float(np.sum((q - x) ** 2)) for x in keys])
        order = np.argsort(d, kind="stable")[:k]
        distances.append(d[order])
        indices.append(order)
    shape = (*queries.shape[:-1], k)
    return np.array(distances).reshape(shape), np.array(indices).reshape(shape)


def _grid_points(n: int, d: int, seed: int) -> torch.Tensor:
    """Small integers: every distance is exact in float64, and many are equal (ties)."""
    return torch.as_tensor(np.random.default_rng(seed).integers(-3, 4, size=(n, d)), dtype=torch.float64)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("block_bytes", [None, 8 * 40 * 3, 1])   # one block; 3 queries a block; 1 a block
@pytest.mark.parametrize("k", [1, 4, 40])
def test_kth_and_nearest_equal_the_loop_ties_included(exact, block_bytes, k):
    keys, queries = _grid_points(40, 3, 0), _grid_points(2 * 7, 3, 1).reshape(2, 7, 3)   # ... × D queries
    expected_d, expected_i = _loop(queries.numpy(), keys.numpy(), k)
    assert (np.diff(expected_d, axis=-1) == 0).any() or k == 1   # the data has ties within the k
    # exact: the distance from the differences, squared (its square root is the distance, bit for bit)
    same = (lambda got, want: np.array_equal(np.sqrt(got), np.sqrt(want))) if exact else np.array_equal
    got_d, got_i = nearest(queries, keys, k, exact=exact, block_bytes=block_bytes)
    assert got_d.shape == got_i.shape == (2, 7, k)
    assert np.array_equal(got_i.numpy(), expected_i) and same(got_d.numpy(), expected_d)
    kth = kth_nearest(queries, keys, k, exact=exact, block_bytes=block_bytes)
    assert kth.shape == (2, 7) and same(kth.numpy(), expected_d[..., -1])


@pytest.mark.parametrize("exact", [False, True])
def test_random_float32_rows_and_a_point_is_its_own_first_neighbour(exact):
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    queries = torch.cat([keys[:20], torch.randn(30, 16, generator=g)])
    expected_d, expected_i = _loop(queries.double().numpy(), keys.double().numpy(), 7)
    got_d, got_i = nearest(queries, keys, 7, exact=exact)
    assert got_d.dtype == torch.float32 and np.array_equal(got_i.numpy(), expected_i)
    np.testing.assert_allclose(got_d.numpy(), expected_d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kth_nearest(queries, keys, 7, exact=exact).numpy(), expected_d[:, -1],
                               rtol=1e-5, atol=1e-6)
    assert np.array_equal(got_i[:20, 0].numpy(), np.arange(20))
    assert float(kth_nearest(queries[:20], keys, 1, exact=exact).abs().max()) <= (0 if exact else 1e-6)


def test_blocks_give_the_one_block_answer():
    g = torch.Generator().manual_seed(4)
    keys, queries = torch.randn(50, 5, generator=g), torch.randn(23, 5, generator=g)
    whole = kth_nearest(queries, keys, 7, block_bytes=10 ** 9)
    for block in (1, 50 * 4, 51 * 4, 333 * 4):  # one query per block, exactly one, a partial last block
        torch.testing.assert_close(kth_nearest(queries, keys, 7, block_bytes=block), whole)
        assert torch.equal(kth_nearest(queries, keys, 7, exact=True, block_bytes=block),
                           kth_nearest(queries, keys, 7, exact=True))


def test_exact_keeps_a_distance_far_below_the_norms():
    keys = torch.tensor([[1e4, 1e4], [0.0, 0.0]], dtype=torch.float64)
    query = torch.tensor([[1e4, 1e4 + 1e-3]], dtype=torch.float64)
    assert float(kth_nearest(query, keys, 1, exact=True).sqrt()) == pytest.approx(1e-3, rel=1e-9)


def test_k_outside_one_to_the_number_of_keys_is_refused_and_no_queries_is_empty():
    keys = torch.zeros(3, 2)
    for k in (0, 4):
        with pytest.raises(ValueError, match="must lie between 1 and the number of keys"):
            kth_nearest(torch.zeros(1, 2), keys, k)
    assert kth_nearest(torch.zeros(0, 2), keys, 2).shape == (0,)
    assert [t.shape for t in nearest(torch.zeros(0, 2), keys, 2)] == [(0, 2), (0, 2)]
