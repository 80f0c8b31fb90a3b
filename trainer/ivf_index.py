"""An approximate top-K index (IVF: inverted file) made of core TensorFlow ops only.

ScaNN's index needs custom ops that the stock TF Serving binary does not link; this one needs
none, so `tensorflow_model_server` loads it like the brute-force graph.

Built at export time (numpy): seeded spherical k-means on the catalog's ad embeddings (a few
Lloyd iterations on a bounded sample, random init, then every ad assigned once, in chunks) splits
the catalog into P partitions. The vectors are stored grouped by partition, as float32, bfloat16 or
int8 with a per-vector symmetric scale, in blocks of `block` rows: a partition is one range of
blocks (start, count), its last block padded with zero vectors that a -inf bias keeps out of every
top K. Ranges rather than a padded [P, max_size] matrix because k-means partitions are uneven (the
largest several times the mean); blocks rather than single rows so the graph gathers a query's ads
in one gather of [block, d] slabs (a few percent of padding, fewer gather indices).

Served (`IvfIndex.__call__`): query tower -> scores against the centroids -> the `nprobe` best
partitions -> their blocks, every query's back to back over the batch (one gather, no padding
between queries) -> exact scores on the dequantised vectors (one matrix-vector product for a single
query, a batched product against each block's own query otherwise) -> per query top-K over its own
scores (only the [batch, candidates] scores are padded to the longest query, never the vectors); the
same (scores, identifiers) as the brute-force index.

A request for more candidates than the `nprobe` partitions hold (the recommender over-fetches by
its exclusions) widens the probe: partitions are added in centroid order until each query's probed
partitions hold k ads. So the index always returns min(k, catalog) real ads, never padding, and
the recommender's exclusions and over-fetch work exactly as over the brute-force index.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from trainer.progress import log

STORAGES = ("float32", "bfloat16", "int8")
SAMPLE_PER_PARTITION = 64  # k-means trains on at most this many ads per partition (bounded work)
LOG_FROM_ADS = 100_000  # catalogs this large log each k-means step to stderr
_CHUNK = 8192  # rows per assignment chunk: bounds the [chunk, P] score matrix
BLOCK = 16  # storage rows per gathered block


def auto_partitions(n_ads: int) -> int:
    """~4 sqrt(n) partitions (about sqrt(n)/4 ads each), at least 1, at most one per ad."""
    return max(1, min(n_ads, round(4 * math.sqrt(n_ads))))


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def assign(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each vector's best centroid by inner product (cosine for unit vectors), in chunks."""
    out = np.empty(len(vectors), np.int32)
    for start in range(0, len(vectors), _CHUNK):
        out[start:start + _CHUNK] = np.argmax(vectors[start:start + _CHUNK] @ centroids.T, axis=1)
    return out


def kmeans(vectors: np.ndarray, n_partitions: int, seed: int, iterations: int = 10,
           verbose: bool | None = None) -> np.ndarray:
    """Spherical k-means: [P, d] unit centroids. Trains on a seeded sample of at most
    SAMPLE_PER_PARTITION x P vectors; an emptied partition restarts at a random sample vector."""
    rng = np.random.default_rng(seed)
    n = len(vectors)
    verbose = n >= LOG_FROM_ADS if verbose is None else verbose
    sample = vectors if n <= SAMPLE_PER_PARTITION * n_partitions else \
        vectors[np.sort(rng.choice(n, SAMPLE_PER_PARTITION * n_partitions, replace=False))]
    sample = _unit(sample.astype(np.float32))
    centroids = sample[rng.choice(len(sample), n_partitions, replace=False)].copy()
    for it in range(iterations):
        started = time.perf_counter()
        labels = assign(sample, centroids)
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=n_partitions)
        filled = np.flatnonzero(counts)
        sums = np.add.reduceat(sample[order], np.concatenate([[0], np.cumsum(counts)[:-1]])[filled], axis=0)
        centroids[filled] = _unit(sums)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            centroids[empty] = sample[rng.choice(len(sample), len(empty), replace=False)]
        if verbose:
            log(f"ivf k-means {it + 1}/{iterations}: {n_partitions} partitions, {len(sample)} sample ads, "
                f"{len(empty)} empty, {time.perf_counter() - started:.1f}s")
    return centroids


@dataclass
class IvfLayout:
    """The built index, in numpy: vectors grouped by partition, `order[i]` the catalog row stored at i."""

    centroids: np.ndarray  # [P, d] float32
    starts: np.ndarray  # [P] int32: partition j is storage rows starts[j] .. starts[j] + sizes[j] - 1
    sizes: np.ndarray  # [P] int32
    order: np.ndarray  # [n] int64: storage row -> catalog row
    build_seconds: float

    @property
    def n_partitions(self) -> int:
        return len(self.centroids)

    def describe(self) -> dict:
        return {"partitions": self.n_partitions, "max_partition_size": int(self.sizes.max()),
                "mean_partition_size": float(self.sizes.mean()), "build_seconds": round(self.build_seconds, 3)}


def build_layout(vectors: np.ndarray, n_partitions: int = 0, seed: int = 0, iterations: int = 10) -> IvfLayout:
    """Partition a catalog's [n, d] embeddings (n_partitions 0: `auto_partitions`). Partitions
    k-means leaves empty are dropped, so P may come out below the number asked for."""
    started = time.perf_counter()
    n = len(vectors)
    if n == 0:
        raise ValueError("an IVF index needs at least one ad")
    p = n_partitions or auto_partitions(n)
    if p > n:
        raise ValueError(f"export.ivf_partitions {p} is more than the catalog's {n} ads")
    centroids = kmeans(vectors, p, seed, iterations)
    labels = assign(np.asarray(vectors, np.float32), centroids)  # argmax is the same for unit or raw vectors
    counts = np.bincount(labels, minlength=p)
    kept = np.flatnonzero(counts)
    remap = np.full(p, -1, np.int64)
    remap[kept] = np.arange(len(kept))
    labels = remap[labels]
    counts = counts[kept]
    order = np.argsort(labels, kind="stable")  # storage row -> catalog row, partition by partition
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    return IvfLayout(centroids=centroids[kept], starts=starts, sizes=counts.astype(np.int32),
                     order=order, build_seconds=time.perf_counter() - started)


def quantise(vectors: np.ndarray, storage: str) -> tuple[np.ndarray | tf.Tensor, np.ndarray | None]:
    """The stored vectors and, for int8, each vector's scale (v ~= q * scale, |q| <= 127)."""
    vectors = np.asarray(vectors, np.float32)
    if storage == "float32":
        return vectors, None
    if storage == "bfloat16":
        return tf.cast(vectors, tf.bfloat16), None
    if storage == "int8":
        scale = np.abs(vectors).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        return np.clip(np.rint(vectors / scale[:, None]), -127, 127).astype(np.int8), scale
    raise ValueError(f"export.ivf_storage {storage!r}: expected one of {list(STORAGES)}")


class IvfIndex(tf.Module):
    """`index(features, k)` -> ([batch, k] scores, [batch, k] identifiers), like the brute-force index.

    `query_model` maps the request's features to [batch, d] float32 query embeddings (None: the
    caller passes the embeddings). `identifiers` ([n], any dtype) are what the index returns per ad.
    `block`: storage rows per gathered block (each partition padded to a whole number of blocks).
    """

    def __init__(self, query_model, embeddings: np.ndarray, identifiers, layout: IvfLayout, nprobe: int,
                 storage: str = "float32", block: int = BLOCK, name: str = "ivf_index"):
        super().__init__(name=name)
        if nprobe < 1:
            raise ValueError(f"export.nprobe {nprobe}: expected an integer >= 1")
        if block < 1:
            raise ValueError(f"ivf block {block}: expected an integer >= 1")
        self.query_model = query_model
        self.n_ads = len(layout.order)
        self.n_partitions = layout.n_partitions
        self.nprobe = min(nprobe, self.n_partitions)  # probing every partition is the exact search
        self.storage = storage
        self.block = block
        blocks = -(-layout.sizes.astype(np.int64) // block)  # per partition
        block_starts = np.concatenate([[0], np.cumsum(blocks)[:-1]])
        # storage row -> catalog row (-1: padding at the end of a partition's last block)
        rows = np.full(int(blocks.sum()) * block, -1, np.int64)
        within = np.arange(self.n_ads) - np.repeat(layout.starts.astype(np.int64), layout.sizes)
        rows[np.repeat(block_starts * block, layout.sizes) + within] = layout.order
        embeddings = np.asarray(embeddings)
        dim = embeddings.shape[1]
        # Stored chunk by chunk: the build holds the catalog, the stored copy and one chunk, never a
        # padded float32 copy next to its quantised one (2.5 GB each at 10M x 64 float32).
        chunks, scales = [], np.ones(len(rows), np.float32) if storage == "int8" else None
        step = block * max(1, _CHUNK * 16 // block)
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            padded = np.zeros((len(part), dim), np.float32)
            padded[part >= 0] = embeddings[part[part >= 0]]
            stored, chunk_scales = quantise(padded, storage)
            chunks.append(tf.convert_to_tensor(stored))
            if scales is not None:
                scales[start:start + len(part)] = chunk_scales
        real = rows >= 0
        # A padding row scores -inf: added to its (zero vector's) score, it is never among the top k.
        bias = np.where(real, 0.0, -np.inf).astype(np.float32).reshape(-1, block)
        variable = lambda value, name: tf.Variable(value, trainable=False, name=name)  # noqa: E731
        self.vectors = variable(tf.reshape(tf.concat(chunks, axis=0), [-1, block, dim]), "vectors")
        del chunks
        self.scales = variable(scales.reshape(-1, block), "scales") if scales is not None else None
        self.bias = variable(bias, "bias")
        self.identifiers = variable(tf.gather(identifiers, np.maximum(rows, 0)), "identifiers")
        self.centroids = variable(layout.centroids, "centroids")
        self.block_starts = variable(block_starts.astype(np.int32), "block_starts")
        self.blocks = variable(blocks.astype(np.int32), "blocks")
        self.sizes = variable(layout.sizes, "sizes")

    def nbytes(self) -> int:
        """Memory of the numeric index (vectors, scales, padding bias, centroids, partition ranges); not the ids."""
        parts = [self.vectors, self.bias, self.centroids, self.block_starts, self.blocks, self.sizes]
        if self.scales is not None:
            parts.append(self.scales)
        return sum(int(np.prod(v.shape)) * v.dtype.size for v in parts)

    def _probes(self, centroid_scores: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
        """[batch, p] partitions to search: the nprobe best, or more when they hold fewer than k ads."""
        best = tf.math.top_k(centroid_scores, k=self.nprobe).indices
        held = tf.reduce_sum(tf.gather(self.sizes, best), axis=1)

        def widen():
            order = tf.math.top_k(centroid_scores, k=self.n_partitions).indices
            cumulative = tf.cumsum(tf.gather(self.sizes, order), axis=1)
            needed = tf.reduce_sum(tf.cast(cumulative < k, tf.int32), axis=1) + 1
            p = tf.minimum(tf.maximum(tf.reduce_max(needed), self.nprobe), self.n_partitions)
            return order[:, :p]

        return tf.cond(tf.reduce_min(held) >= k, lambda: best, widen)

    def search(self, queries: tf.Tensor, k) -> tuple[tf.Tensor, tf.Tensor]:
        """[batch, d] query embeddings -> top-k (scores, identifiers)."""
        queries = tf.cast(queries, tf.float32)
        k = tf.minimum(tf.cast(k, tf.int32), self.n_ads)
        probes = self._probes(tf.linalg.matmul(queries, self.centroids, transpose_b=True), k)  # [B, p]
        starts = tf.gather(self.block_starts, probes)
        counts = tf.gather(self.blocks, probes)
        # Every query's probed blocks, back to back over the batch (no padding between queries): one
        # gather of contiguous [block, d] slabs, each scored against its own query.
        blocks = tf.ragged.range(tf.reshape(starts, [-1]), tf.reshape(starts + counts, [-1])).flat_values  # [T]
        per_query = tf.reduce_sum(counts, axis=1)  # [B] blocks
        batch, dim = tf.shape(queries)[0], self.vectors.shape[-1]
        vectors = tf.cast(tf.gather(self.vectors, blocks), tf.float32)  # [T, block, d]

        def one_query():  # one matrix-vector product: a batched matmul of [block, d] x [d, 1] is several x slower
            return tf.reshape(tf.linalg.matmul(tf.reshape(vectors, [-1, dim]), queries, transpose_b=True),
                              [-1, self.block])

        def per_block_query():
            owner = tf.repeat(tf.range(batch), per_query)  # [T] the query of each block
            return tf.squeeze(tf.linalg.matmul(vectors, tf.gather(queries, owner)[:, :, None]), axis=2)

        scores = tf.cond(tf.equal(batch, 1), one_query, per_block_query)  # [T, block]
        if self.scales is not None:
            scores = scores * tf.gather(self.scales, blocks)
        scores = scores + tf.gather(self.bias, blocks)
        # Only the scores are padded to the batch's longest candidate list (4 bytes a candidate).
        lengths = per_query * self.block
        ragged = tf.RaggedTensor.from_row_lengths(tf.reshape(scores, [-1]), lengths)
        top = tf.math.top_k(ragged.to_tensor(default_value=float("-inf")), k=k)
        position = tf.cumsum(lengths, exclusive=True)[:, None] + top.indices  # into the flat scores
        block_of, row_in_block = position // self.block, position % self.block
        rows = tf.gather(blocks, block_of) * self.block + row_in_block
        return top.values, tf.gather(self.identifiers, rows)

    def __call__(self, features, k) -> tuple[tf.Tensor, tf.Tensor]:
        queries = self.query_model(features) if self.query_model is not None else features
        return self.search(queries, k)
