"""An inverted-file index over one KV head's keys, partitioned for the queries that will search it.

Queries and keys of a layer are distributed differently (RetrievalAttention's observation): a
query's score against a list is only as good as the list is tight *in the directions queries
use*, and plain k-means on keys measures tightness in key space. Here the lists are cut by
k-means under the metric the queries induce: with M = E[q qᵀ] over a sample of the prefill's own
queries, the expected squared error of scoring a key k by its list's mean c is
E[(q·(k - c))²] = (k - c)ᵀ M (k - c), so keys are clustered after the map k -> M^½ k, which
minimises exactly that error (the attention-aware part). A query probes the lists whose mean
key scores highest (q·c, the list's mean score) and scans them exactly (faiss IndexIVFFlat,
inner product), so what it returns are the true scores of the keys it found.
`partition="keys"` clusters the raw keys instead (a plain IVF, for comparison).

Measured on Qwen2.5-Coder-0.5B at 8K (benchmarks/load.py): with a quarter of the lists probed,
this finds the true top-128 keys of decode queries at ~0.9 recall; learnt routing tables (which
lists held the top keys of similar prefill queries) did worse than q·c routing, and so did
box (Quest-style) and ball upper bounds, so they are not used.

Why faiss rather than hnswlib: faiss-cpu installs as a wheel (no compiler); its IVF takes lists
assigned from outside (`add_preassigned`), which is where the query-metric partition plugs in,
while routing and the exact scan stay batched, multi-threaded C++; its k-means is fast. hnswlib
builds its graph from key-key distances only, with no place for the prefill queries.
"""

from __future__ import annotations

import numpy as np
import torch

KMEANS_ITERATIONS = 12


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().float().cpu().numpy())


def _kmeans(data: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    import faiss

    kmeans = faiss.Kmeans(data.shape[1], clusters, niter=KMEANS_ITERATIONS, seed=seed, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 20)
    kmeans.train(data)
    return kmeans.centroids


def query_metric(queries: torch.Tensor) -> torch.Tensor:
    """M^½ for M = E[q qᵀ] over `queries` [m, d] (symmetric, [d, d]): k -> k @ M^½ measures keys as queries see them."""
    queries = queries.detach().float().cpu()
    moment = queries.T @ queries / max(1, queries.shape[0])
    values, vectors = torch.linalg.eigh(moment)
    return vectors @ torch.diag(values.clamp(min=1e-12).sqrt()) @ vectors.T


class AttentionIVF:
    """Exact inner-product IVF over `keys` [n, d] in `nlist` lists, `scan` of them probed per query.

    With `queries` [m, d] (a sample of the prefill's queries) the lists are cut under the query
    metric; with None, by plain k-means on the keys.
    """

    def __init__(self, keys: torch.Tensor, queries: torch.Tensor | None, nlist: int, scan: float,
                 seed: int = 0) -> None:
        import faiss
        from faiss.contrib.ivf_tools import add_preassigned

        keys = keys.detach().float().cpu()
        self.size, self.dim = keys.shape
        self.nlist = max(1, min(nlist, self.size))
        space = keys @ query_metric(queries) if queries is not None and queries.shape[0] > 0 else keys
        centroids = torch.from_numpy(_kmeans(_numpy(space), self.nlist, seed))
        assign = torch.cdist(space, centroids).argmin(-1)
        sizes = torch.bincount(assign, minlength=self.nlist).clamp(min=1)
        means = torch.zeros(self.nlist, self.dim).index_add_(0, assign, keys) / sizes[:, None]
        self.quantizer = faiss.IndexFlatIP(self.dim)  # routes by q · (mean key of the list)
        self.quantizer.add(_numpy(means))
        self.index = faiss.IndexIVFFlat(self.quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.is_trained = True
        add_preassigned(self.index, _numpy(keys), assign.numpy().astype(np.int64))
        self.index.nprobe = max(1, min(self.nlist, round(scan * self.nlist)))

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [m, d] -> (inner products [m, k] float32, key ids [m, k] long; -1 where fewer found)."""
        scores, ids = self.index.search(_numpy(queries), k)
        return torch.from_numpy(scores), torch.from_numpy(ids).long()

    def nbytes(self) -> int:
        """Bytes the index holds: float32 keys, 8-byte ids, list means."""
        return self.size * (4 * self.dim + 8) + self.nlist * self.dim * 4
