"""An inverted-file index over one KV head's keys, partitioned for the queries that will search it.

Queries and keys of a layer are distributed differently (RetrievalAttention's observation): a
query's score against a list is only as good as the list is tight *in the directions queries
use*, and plain k-means on keys measures tightness in key space. Here the lists are cut by
k-means under the metric the queries induce: with M = E[q qᵀ] over a sample of the prefill's own
queries, the expected squared error of scoring a key k by its list's mean c is
E[(q·(k - c))²] = (k - c)ᵀ M (k - c), so keys are clustered after the map k -> M^½ k, which
minimises exactly that error (the attention-aware part). A query probes the lists whose mean
key scores highest (q·c, the list's mean score) and scans them exactly, so what it returns
are the true scores of the keys it found. `partition="keys"` clusters the raw keys instead (a
plain IVF, for comparison).

Measured on Qwen2.5-Coder-0.5B (benchmarks/results/load.json): with a quarter of the lists
probed (and a GQA group's probes pooled, see `search`), decode queries find their true top-2048
middle keys at 0.81 recall at 8K and 0.90 at 16K, covering 0.98 of the attention mass. While
designing it (per-query probing, 8K, 6 layer/head pairs), learnt routing tables (which lists
held the top keys of similar prefill queries) did worse than q·c routing, and so did box
(Quest-style) and ball upper bounds, so they are not used; the query metric gained ~3 points of
top-2048 recall over plain key k-means.

Library choice: faiss-cpu (a wheel, no compiler) trains the lists: its k-means is fast C++ and
takes any vectors, here the keys mapped by the query metric. hnswlib was not an option: it builds
its graph from key-key distances only, with no place for the prefill queries. The scan itself is
torch over list-contiguous keys: faiss's IndexIVFFlat search with k = 2048 measured 7.8 ms per
KV head at 16K (its result heap dominates at such k) against ~2 ms for a matmul and top-k over
the same lists, and a GQA group's queries share one candidate fetch.
"""

from __future__ import annotations

import numpy as np
import torch

KMEANS_ITERATIONS = 12


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().float().cpu().numpy())


def _kmeans(data: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    import faiss  # heavy (own BLAS and OpenMP): loaded by the first index build, not with kvlife.methods

    kmeans = faiss.Kmeans(data.shape[1], clusters, niter=KMEANS_ITERATIONS, seed=seed, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 20)
    kmeans.train(data)
    return kmeans.centroids


def query_metric(queries: torch.Tensor) -> torch.Tensor:
    """M^½ for M = E[q qᵀ] over `queries` [m, d] (symmetric, [d, d]): k -> k @ M^½ measures keys as queries
    see them."""
    queries = queries.detach().float().cpu()
    moment = queries.T @ queries / max(1, queries.shape[0])
    values, vectors = torch.linalg.eigh(moment)
    return vectors @ torch.diag(values.clamp(min=1e-12).sqrt()) @ vectors.T


class AttentionIVF:
    """Exact inner-product IVF over `keys` [n, d] in `nlist` lists, `scan` of them probed per query.

    With `queries` [m, d] (a sample of the prefill's queries) the lists are cut under the query
    metric; with None, by plain k-means on the keys. Keys are stored list-contiguous; a search
    scans the union of the lists its queries probe (a GQA group's heads fetch one candidate set
    and each takes its own top-k from it, so recall is at least that of per-query probing).
    """

    def __init__(self, keys: torch.Tensor, queries: torch.Tensor | None, nlist: int, scan: float,
                 seed: int = 0) -> None:
        keys = keys.detach().float().cpu()
        self.size, self.dim = keys.shape
        self.nlist = max(1, min(nlist, self.size))
        self.nprobe = max(1, min(self.nlist, round(scan * self.nlist)))
        space = keys @ query_metric(queries) if queries is not None and queries.shape[0] > 0 else keys
        centroids = torch.from_numpy(_kmeans(_numpy(space), self.nlist, seed))
        assign = torch.cdist(space, centroids).argmin(-1)
        sizes = torch.bincount(assign, minlength=self.nlist)
        self.means = (
            torch.zeros(self.nlist, self.dim).index_add_(0, assign, keys) / sizes.clamp(min=1)[:, None]
        )
        self.means[sizes == 0] = 0.0
        order = torch.argsort(assign, stable=True)
        self.keys, self.ids, self.slot_list = keys[order].contiguous(), order, assign[order]
        self.last_scanned = 0.0  # share of the keys the last search scanned

    def probe(self, queries: torch.Tensor) -> torch.Tensor:
        """Bool [nlist]: the lists whose mean key scores in the top `nprobe` for any of the queries."""
        top = (queries @ self.means.T).topk(self.nprobe, dim=-1).indices
        chosen = torch.zeros(self.nlist, dtype=torch.bool)
        chosen[top.flatten()] = True
        return chosen

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [m, d] -> (inner products [m, k] float32, key ids [m, k] long; -1 where fewer found)."""
        queries = queries.detach().float().cpu()
        candidates = torch.nonzero(self.probe(queries)[self.slot_list]).flatten()
        self.last_scanned = candidates.numel() / max(1, self.size)
        scores = queries @ self.keys.index_select(0, candidates).T
        found = min(k, candidates.numel())
        top = scores.topk(found, dim=-1)
        ids = self.ids[candidates[top.indices]]
        if found < k:  # fewer candidates than asked for: pad with -1 / -inf
            pad = k - found
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], dim=-1)
            return torch.cat(
                [top.values, top.values.new_full((ids.shape[0], pad), float("-inf"))], dim=-1
            ), ids
        return top.values, ids

    def nbytes(self) -> int:
        """Bytes the index holds: float32 keys, 8-byte ids and list numbers, list means."""
        return self.size * (4 * self.dim + 16) + self.nlist * self.dim * 4
