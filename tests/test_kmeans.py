"""Spherical K-means: FAISS and the torch fallback recover planted clusters and agree on the objective."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mcscale.metrics import cluster_metrics
from mcscale.models.kmeans import faiss_available, spherical_kmeans


def _planted(n_per, k, dim, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    sizes = [max(3, n_per // (i + 1)) for i in range(k)]  # long-tailed cluster sizes, awkward counts
    x = torch.cat([centres[i] + spread * torch.randn(s, dim, generator=g) for i, s in enumerate(sizes)])
    y = np.concatenate([np.full(s, i) for i, s in enumerate(sizes)])
    return x, y, centres


BACKENDS = ["torch"] + (["faiss"] if faiss_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_recovers_planted_long_tailed_clusters(backend):
    x, y, centres = _planted(200, 7, 16, 0.05, seed=1)
    # scale rows: spherical K-means must not care about norms
    x = x * torch.linspace(0.5, 3.0, x.shape[0])[:, None]
    # a single K-means run can stop in a local optimum; the best of 10 finds the planted clusters
    found, assign = spherical_kmeans(x, 7, iters=30, seed=0, backend=backend, nredo=10)
    assert found.shape == (7, 16)
    assert torch.allclose(found.norm(dim=1), torch.ones(7), atol=1e-5)
    assert cluster_metrics(y, assign.numpy())["acc"] == 1.0
    # every planted centre has a found centre within a small angle
    assert (centres @ found.T).max(dim=1).values.min() > 0.99


def test_faiss_and_torch_reach_the_same_objective():
    if not faiss_available():
        pytest.skip("faiss not installed")
    x, _, _ = _planted(120, 5, 8, 0.3, seed=3)
    xn = F.normalize(x, dim=1)
    scores = {}
    for backend in ("torch", "faiss"):
        c, a = spherical_kmeans(x, 5, iters=50, seed=0, backend=backend, nredo=3)
        # assignment is the nearest centre, and the objective is the sum of cosines
        assert torch.equal(a, (xn @ c.T).argmax(1))
        scores[backend] = float((xn * c[a]).sum())
    assert scores["torch"] == pytest.approx(scores["faiss"], rel=0.02)


def test_faiss_does_not_subsample():
    """With 3 x 700 points and 3 centres FAISS would train on only 768 points by default."""
    if not faiss_available():
        pytest.skip("faiss not installed")
    g = torch.Generator().manual_seed(0)
    axes = torch.eye(3)
    # three far-apart clusters: only training on every point makes each centre the normalised
    # mean of all its points (a 256-point subsample is off by about 0.15 / 16 = 0.01)
    x = torch.cat([F.normalize(axes[i] + 0.15 * torch.randn(700, 3, generator=g), dim=1) for i in range(3)])
    c, a = spherical_kmeans(x, 3, iters=20, seed=0, backend="faiss", nredo=5)
    for k in range(3):
        expected = F.normalize(x[a == k].mean(0), dim=0)
        assert torch.allclose(c[k], expected, atol=1e-4)
    assert sorted(torch.bincount(a).tolist()) == [700, 700, 700]


def _six_arcs():
    """180 unit vectors in six tight groups on a circle (angles 0, 30, 60, 120, 200 and 260 degrees):
    with K = 3 spherical K-means has several local optima (which neighbouring groups get merged)."""
    g = torch.Generator().manual_seed(0)
    angles = np.deg2rad([0, 30, 60, 120, 200, 260])
    centres = torch.tensor(np.stack([np.cos(angles), np.sin(angles), np.zeros(6)], 1), dtype=torch.float32)
    x = torch.cat([c + 0.03 * torch.randn(30, 3, generator=g) for c in centres])
    return F.normalize(x, dim=1), np.repeat(np.arange(6), 30)


def _partition_objective(x, assign):
    """Plain reference: the best spherical K-means objective of a partition, sum_j ||sum_{i in j} x_i||
    (the sum of cosines to the normalised cluster means), in float64."""
    x = x.numpy().astype(np.float64)
    return sum(np.linalg.norm(x[assign == j].sum(0)) for j in np.unique(assign))


def test_deterministic_for_a_seed():
    x, groups = _six_arcs()
    k = 3
    # brute force over the partitions that keep each tight group whole: the global optimum
    optimum, best = max((_partition_objective(x, np.asarray(p)[groups]), p)
                        for p in itertools.product(range(k), repeat=6) if len(set(p)) == k)
    c1, a1 = spherical_kmeans(x, k, seed=7, backend="torch")
    c2, a2 = spherical_kmeans(x, k, seed=7, backend="torch")
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    objectives = {}
    for seed in range(10):
        centres, assign = spherical_kmeans(x, k, seed=seed, backend="torch")
        a = assign.numpy()
        # a Lloyd fixed point: every point at its nearest centre, every centre the normalised mean
        assert torch.equal(assign, (x @ centres.T).argmax(1))
        for j in range(k):
            torch.testing.assert_close(centres[j], F.normalize(x[assign == j].mean(0), dim=0), rtol=0, atol=1e-5)
        value = _partition_objective(x, a)
        assert float((x * centres[assign]).sum()) == pytest.approx(value, rel=1e-5)
        assert value <= optimum + 1e-6
        objectives[seed] = value
    # different seeds end in different local optima here (so the seed is used), some below the optimum
    assert len({round(v, 3) for v in objectives.values()}) >= 2
    assert min(objectives.values()) < optimum - 1.0
    # the best of several restarts finds the global optimum and its partition of the groups
    _, assign = spherical_kmeans(x, k, seed=1, backend="torch", nredo=10)
    assert _partition_objective(x, assign.numpy()) == pytest.approx(optimum, rel=1e-6)
    assert cluster_metrics(np.asarray(best)[groups], assign.numpy())["acc"] == 1.0


def test_auto_backend_uses_faiss_on_cpu_and_torch_for_cuda_features_without_a_gpu_faiss(monkeypatch):
    import mcscale.models.kmeans as km

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert km._use_faiss("torch", cpu) is False and km._use_faiss("faiss", cuda) is True
    if not faiss_available():
        assert km._use_faiss("auto", cpu) is False
        return
    monkeypatch.setattr(km, "faiss_gpus", lambda: 0)  # faiss-cpu, the locked build
    assert km._use_faiss("auto", cpu) is True and km._use_faiss("auto", cuda) is False
    monkeypatch.setattr(km, "faiss_gpus", lambda: 2)  # a GPU build the user installed
    assert km._use_faiss("auto", cuda) is True
