"""An attention-aware inverted-file index over one KV head's keys (faiss on the CPU).

Queries and keys of a layer are differently distributed (RetrievalAttention's observation): an
index that clusters the keys places its lists where keys are, not where the queries that will
search them point, and an inner-product search then needs to scan a large share of the keys to
find a query's true top-k. Here the coarse quantizer is trained on the prefill's own queries
(spherical k-means on their directions), so the lists partition *query* space: each key joins
the list of the query centroid that scores it highest (max c·k), and a decode query probes the
lists of the centroids closest to its direction. The scan inside the probed lists is exact
(IndexIVFFlat, inner product), so what it returns are the true scores of the keys it found.
`centroids="keys"` trains on the keys instead (a plain IVF, for comparison).

Why faiss rather than hnswlib: faiss-cpu installs as a wheel (no compiler), gives an IVF whose
quantizer we can train on any vectors (here the queries) with an exact inner-product scan and a
batched, multi-threaded search, and its k-means is fast; hnswlib builds its graph from key-key
distances only, with no way to bring the queries into the build.
"""

from __future__ import annotations

import numpy as np
import torch

KMEANS_ITERATIONS = 12


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().float().cpu().numpy())


class AttentionIVF:
    """Inner-product IVF over `keys` [n, d] with lists cut by k-means of `train` [m, d] directions."""

    def __init__(self, keys: torch.Tensor, train: torch.Tensor, nlist: int, scan: float, seed: int = 0) -> None:
        import faiss

        data, train_data = _numpy(keys), _numpy(train)
        dim = data.shape[1]
        nlist = max(1, min(nlist, train_data.shape[0], data.shape[0]))
        norms = np.linalg.norm(train_data, axis=1, keepdims=True)
        train_data = train_data / np.maximum(norms, 1e-12)
        kmeans = faiss.Kmeans(dim, nlist, niter=KMEANS_ITERATIONS, spherical=True, seed=seed, verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=1 << 20)
        kmeans.train(train_data)
        self.quantizer = faiss.IndexFlatIP(dim)
        self.quantizer.add(kmeans.centroids)
        self.index = faiss.IndexIVFFlat(self.quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.is_trained = True
        self.index.add(data)
        self.index.nprobe = max(1, min(nlist, round(scan * nlist)))
        self.size, self.dim, self.nlist = data.shape[0], dim, nlist

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [m, d] -> (inner products [m, k] float32, key ids [m, k] long; -1 where fewer found)."""
        scores, ids = self.index.search(_numpy(queries), k)
        return torch.from_numpy(scores), torch.from_numpy(ids).long()

    def nbytes(self) -> int:
        """Bytes the index holds: float32 keys, 8-byte ids, centroids."""
        return self.size * (4 * self.dim + 8) + self.nlist * self.dim * 4
