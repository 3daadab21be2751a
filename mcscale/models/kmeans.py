"""Spherical K-means for head initialisation: FAISS or plain torch.

``auto``: FAISS for features on the CPU (faiss-cpu is a locked dependency) or when the installed FAISS
sees a GPU; torch K-means on the features' own device otherwise (CUDA features without a GPU FAISS).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _use_faiss(backend: str, device: torch.device) -> bool:
    if backend != "auto":
        return backend == "faiss"
    return faiss_available() and (device.type == "cpu" or faiss_gpus() > 0)


def _faiss_kmeans(x: np.ndarray, k: int, iters: int, seed: int, nredo: int):
    import faiss

    use_gpu = faiss_gpus() > 0
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iters,
        nredo=nredo,
        spherical=True,
        seed=seed,
        gpu=use_gpu,
        verbose=False,
        # FAISS silently subsamples to 256 points per centroid unless told otherwise.
        max_points_per_centroid=max(256, (x.shape[0] + k - 1) // k + 1),
        min_points_per_centroid=1,
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    return km.centroids.copy(), assign[:, 0].astype(np.int64)


def _torch_kmeans(x: torch.Tensor, k: int, iters: int, seed: int, nredo: int):
    """Lloyd iterations on the unit sphere with k-means++ seeding; best of ``nredo`` by objective."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    best = None
    for _ in range(nredo):
        centers = _kmeans_pp(x, k, g)
        for _ in range(iters):
            assign = (x @ centers.T).argmax(dim=1)
            sums = torch.zeros_like(centers).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k)
            empty = counts == 0
            if empty.any():  # re-seed an empty centre with the worst-served points
                worst = (x * centers[assign]).sum(1).argsort()[: int(empty.sum())]
                sums[empty] = x[worst]
            centers = F.normalize(sums, dim=1)
        score = (x @ centers.T).max(dim=1).values.sum()
        if best is None or score > best[0]:
            best = (score, centers, (x @ centers.T).argmax(dim=1))
    return best[1], best[2]


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    first = torch.randint(0, n, (1,), generator=g, device=x.device)
    chosen = [int(first)]
    dist = (2 - 2 * (x @ x[first].T).squeeze(1)).clamp_min(0)
    for _ in range(1, k):
        if float(dist.sum()) <= 0:
            idx = int(torch.randint(0, n, (1,), generator=g, device=x.device))
        else:
            idx = int(torch.multinomial(dist, 1, generator=g))
        chosen.append(idx)
        dist = torch.minimum(dist, (2 - 2 * (x @ x[idx])).clamp_min(0))
    return x[chosen].clone()


def spherical_kmeans(
    features: torch.Tensor, k: int, iters: int = 50, seed: int = 0, backend: str = "auto", nredo: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster L2-normalised ``features`` into ``k`` groups; returns (unit centres k x D, assignment N)."""
    x = F.normalize(features.detach().float(), dim=1)
    if _use_faiss(backend, features.device):
        centers, assign = _faiss_kmeans(x.cpu().numpy().astype(np.float32), k, iters, seed, nredo)
        centers = F.normalize(torch.from_numpy(centers), dim=1)
        return centers.to(features.device), torch.from_numpy(assign).to(features.device)
    centers, assign = _torch_kmeans(x, k, iters, seed, nredo)
    return centers, assign
