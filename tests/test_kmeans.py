"""Spherical K-means: FAISS and the torch fallback recover planted clusters and agree on the objective."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mcscale.kmeans import faiss_available, spherical_kmeans
from mcscale.metrics import cluster_metrics


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


def test_deterministic_for_a_seed():
    x, _, _ = _planted(50, 4, 6, 0.4, seed=5)
    a1 = spherical_kmeans(x, 4, seed=7, backend="torch")[1]
    a2 = spherical_kmeans(x, 4, seed=7, backend="torch")[1]
    assert torch.equal(a1, a2)
