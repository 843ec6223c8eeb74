"""Planar point-set problems of Pointer Networks (Vinyals, Fortunato & Jaitly 2015), generated locally.

Points are uniform in ``[0, 1]²``. Every generator returns a :class:`PointerBatch`: ``points`` ``[b, n_max, 2]``
float32 right-padded with zeros, ``mask`` ``[b, n_max]`` bool (``True`` = a real point), ``targets``
``[b, T]`` int32 — input positions, ``IGNORE`` (−1) after the end — and task extras.

- :func:`convex_hull`: the hull's vertices from ``scipy.spatial.ConvexHull``, counter-clockwise, starting from
  the lowest index, then that first index again: the pointer *closes* the polygon, which ends the sequence
  (``T = n_max + 1``). Extra: ``area`` ``[b]``, the hull's area.
- :func:`delaunay`: the triangles of ``scipy.spatial.Delaunay``, each as its three indices ascending,
  triangles in lexicographic order, flattened, then ``n_max`` (a pointer past the points: the end)
  (``T = 3 · max triangles + 1``). Extra: ``triangles``, a list of ``[m, 3]`` arrays.
- :func:`tsp`: a tour through every point starting at index 0, in the direction whose second city has the
  smaller index than the last (so a tour and its reverse have one label). Exact by Held–Karp dynamic
  programming for ``n <= 10`` (``exact=True``); a 2-opt local optimum from the nearest-neighbour tour above.
  Extra: ``length`` ``[b]``, the tour's length (closed).

Metrics against these labels: :func:`hull_scores` (exact sequence, area coverage, valid polygon),
:func:`delaunay_scores` (exact, triangle coverage), :func:`tour_lengths`; and the trivial tours
:func:`nearest_neighbour_tour` and :func:`random_tour`.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy.spatial import ConvexHull, Delaunay

from seqjax.tasks import IGNORE

__all__ = [
    "PointerBatch", "convex_hull", "delaunay", "tsp", "held_karp", "two_opt", "brute_force_tour", "tour_length",
    "tour_lengths", "nearest_neighbour_tour", "random_tour", "polygon_area", "hull_scores", "delaunay_scores",
    "decoded_sequence",
]

EXACT_TSP_MAX = 10  # Held–Karp is O(2^n n^2); above this the label is a 2-opt local optimum


@dataclasses.dataclass
class PointerBatch:
    points: np.ndarray  # [b, n_max, 2] float32
    mask: np.ndarray  # [b, n_max] bool
    targets: np.ndarray  # [b, T] int32, IGNORE after the end
    extras: dict = dataclasses.field(default_factory=dict)

    def __len__(self):
        return len(self.points)

    def __getitem__(self, idx):
        sub = {k: (v[idx] if isinstance(v, np.ndarray) else list(np.asarray(v, dtype=object)[idx]))
               for k, v in self.extras.items()}
        return PointerBatch(self.points[idx], self.mask[idx], self.targets[idx], sub)


def _sizes(rng, num: int, n, minimum: int, name: str = "n") -> np.ndarray:
    lo, hi = (n, n) if np.isscalar(n) else tuple(n)
    if not minimum <= lo <= hi:
        raise ValueError(f"{name} must be an int or a (lo, hi) pair with {minimum} <= lo <= hi, got {n!r}")
    return rng.integers(lo, hi + 1, size=num) if hi > lo else np.full(num, lo)


def _points(rng, sizes) -> tuple[np.ndarray, np.ndarray]:
    n_max = int(sizes.max())
    pts = rng.random((len(sizes), n_max, 2)).astype(np.float32)
    mask = np.arange(n_max)[None] < sizes[:, None]
    return np.where(mask[..., None], pts, 0.0).astype(np.float32), mask


def _check_points(name: str, pts) -> np.ndarray:
    pts = np.asarray(pts)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{name} must have shape [n, 2] (planar points), got {list(pts.shape)}")
    return pts.astype(np.float64)


# ----------------------------------------------------------------------------- convex hull


def hull_sequence(pts) -> list[int]:
    """Hull vertices counter-clockwise from the lowest index, and that index again (the closing pointer)."""
    pts = _check_points("pts", pts)
    if len(pts) < 3:
        raise ValueError(f"pts needs at least 3 points for a hull, got {len(pts)}")
    v = list(ConvexHull(pts).vertices)  # counter-clockwise in 2-D
    k = v.index(min(v))
    v = v[k:] + v[:k]
    return v + [v[0]]


def polygon_area(pts, order) -> float:
    """Signed shoelace area of the polygon ``pts[order]`` (positive when counter-clockwise)."""
    p = np.asarray(pts, np.float64)[list(order)]
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def convex_hull(num: int, n=(5, 20), *, seed: int = 0) -> PointerBatch:
    """``num`` point sets with ``n`` points (an int, or ``(lo, hi)`` drawn uniformly per set) and their hulls."""
    rng = np.random.default_rng(seed)
    sizes = _sizes(rng, num, n, 3)
    pts, mask = _points(rng, sizes)
    targets = np.full((num, pts.shape[1] + 1), IGNORE, np.int32)
    area = np.zeros(num, np.float64)
    for i, m in enumerate(sizes):
        seq = hull_sequence(pts[i, :m])
        targets[i, : len(seq)] = seq
        area[i] = polygon_area(pts[i], seq[:-1])
    return PointerBatch(pts, mask, targets, {"area": area})


def decoded_sequence(row) -> list[int]:
    """The pointers of one decoded row up to its first ``IGNORE``."""
    row = list(np.asarray(row))
    return row[: row.index(IGNORE)] if IGNORE in row else row


def _segments_cross(p1, p2, q1, q2) -> bool:
    d = lambda a, b, c: (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    return d(p1, p2, q1) * d(p1, p2, q2) < 0 and d(q1, q2, p1) * d(q1, q2, p2) < 0


def _simple_polygon(p) -> bool:
    k = len(p)
    for i in range(k):
        for j in range(i + 2, k):
            if i == 0 and j == k - 1:
                continue  # neighbouring edges through the closing vertex
            if _segments_cross(p[i], p[(i + 1) % k], p[j], p[(j + 1) % k]):
                return False
    return True


def hull_scores(batch: PointerBatch, preds) -> dict:
    """Exact-sequence accuracy, area coverage and the fraction of valid polygons of decoded hulls.

    ``preds`` ``[b, T']`` pointers (``IGNORE`` after the end). A prediction is a valid polygon when it is closed
    (ends by repeating its first index), visits at least 3 real points once each and does not cross itself;
    its coverage is ``|area(pred)| / area(hull)``, 0 for an invalid one.
    """
    preds = np.asarray(preds)
    exact, cover, valid = [], [], []
    for i in range(len(batch)):
        seq, tgt = decoded_sequence(preds[i]), decoded_sequence(batch.targets[i])
        exact.append(seq == tgt)
        body = seq[:-1]
        ok = (len(seq) >= 4 and seq[-1] == seq[0] and len(set(body)) == len(body)
              and all(0 <= j < len(batch.mask[i]) and batch.mask[i][j] for j in body))
        ok = ok and _simple_polygon(np.asarray(batch.points[i], np.float64)[body])
        valid.append(ok)
        cover.append(abs(polygon_area(batch.points[i], body)) / batch.extras["area"][i] if ok else 0.0)
    return {"exact": float(np.mean(exact)), "area_coverage": float(np.mean(cover)), "valid": float(np.mean(valid))}


# ----------------------------------------------------------------------------- Delaunay


def delaunay_triangles(pts) -> np.ndarray:
    """``[m, 3]`` triangles, indices ascending within each, rows in lexicographic order."""
    tri = np.sort(Delaunay(_check_points("pts", pts)).simplices, axis=1)
    return tri[np.lexsort(tri.T[::-1])].astype(np.int32)


def delaunay(num: int, n=5, *, seed: int = 0) -> PointerBatch:
    """``num`` point sets and their Delaunay triangulations (targets: the triangles flattened)."""
    rng = np.random.default_rng(seed)
    sizes = _sizes(rng, num, n, 3)
    pts, mask = _points(rng, sizes)
    tris = [delaunay_triangles(pts[i, :m]) for i, m in enumerate(sizes)]
    targets = np.full((num, 3 * max(len(t) for t in tris) + 1), IGNORE, np.int32)
    for i, t in enumerate(tris):
        targets[i, : t.size + 1] = np.append(t.reshape(-1), pts.shape[1])
    return PointerBatch(pts, mask, targets, {"triangles": tris})


def delaunay_scores(batch: PointerBatch, preds) -> dict:
    """Exact accuracy (the same set of triangles) and triangle coverage (the fraction of true triangles
    predicted, as a set of index triples; the end pointer and a trailing incomplete triple are dropped)."""
    preds = np.asarray(preds)
    exact, cover = [], []
    for i in range(len(batch)):
        seq = [j for j in decoded_sequence(preds[i]) if j < batch.points.shape[1]]
        got = {tuple(sorted(seq[j : j + 3])) for j in range(0, len(seq) - len(seq) % 3, 3)}
        want = {tuple(t) for t in batch.extras["triangles"][i].tolist()}
        exact.append(got == want)
        cover.append(len(got & want) / len(want))
    return {"exact": float(np.mean(exact)), "triangle_coverage": float(np.mean(cover))}


# ----------------------------------------------------------------------------- TSP


def _distances(pts) -> np.ndarray:
    return np.sqrt(((pts[..., :, None, :] - pts[..., None, :, :]) ** 2).sum(-1))


def tour_length(pts, tour) -> float:
    """Length of the closed tour ``pts[tour]``."""
    p = np.asarray(pts, np.float64)[list(tour)]
    return float(np.sqrt(((p - np.roll(p, -1, axis=0)) ** 2).sum(-1)).sum())


def tour_lengths(batch: PointerBatch, tours) -> tuple[np.ndarray, np.ndarray]:
    """``(length [b], valid [b])`` of decoded tours: valid when it visits every real point exactly once;
    an invalid tour's length is NaN."""
    tours = np.asarray(tours)
    lengths, valid = np.full(len(batch), np.nan), np.zeros(len(batch), bool)
    for i in range(len(batch)):
        seq, n = decoded_sequence(tours[i]), int(batch.mask[i].sum())
        if sorted(seq) == list(range(n)):
            valid[i] = True
            lengths[i] = tour_length(batch.points[i], seq)
    return lengths, valid


def _canonical(tour) -> list[int]:
    tour = list(tour)
    k = tour.index(0)
    tour = tour[k:] + tour[:k]
    return tour if len(tour) < 3 or tour[1] < tour[-1] else [0] + tour[1:][::-1]


def brute_force_tour(pts) -> tuple[list[int], float]:
    """The optimal tour by trying every permutation (a test oracle; ``n <= 8``)."""
    pts = _check_points("pts", pts)
    n = len(pts)
    best = min(((0,) + p for p in itertools.permutations(range(1, n))), key=lambda t: tour_length(pts, t))
    return _canonical(best), tour_length(pts, best)


def held_karp(pts) -> tuple[np.ndarray, np.ndarray]:
    """Exact tours of a batch ``pts`` ``[b, n, 2]`` (``n <= 12``) by Held–Karp dynamic programming, vectorised
    over the batch: ``(tours [b, n] int32 canonical, lengths [b])``.

    ``dp[S, j]`` is the shortest path from city 0 through the set ``S`` of cities ``1..n-1`` ending at ``j ∈ S``:
    ``dp[S, j] = min_{i ∈ S∖{j}} dp[S∖{j}, i] + d(i, j)``.
    """
    pts = np.asarray(pts, np.float64)
    if pts.ndim != 3 or pts.shape[-1] != 2:
        raise ValueError(f"pts must have shape [batch, n, 2], got {list(pts.shape)}")
    b, n = pts.shape[:2]
    if not 2 <= n <= 12:
        raise ValueError(f"held_karp needs 2 <= n <= 12 points (O(2^n n^2)), got n={n}")
    d = _distances(pts)
    m = n - 1
    dp = np.full((b, 1 << m, m), np.inf)
    parent = np.zeros((b, 1 << m, m), np.int8)
    for j in range(m):
        dp[:, 1 << j, j] = d[:, 0, j + 1]
    bits = np.arange(m)
    dd = d[:, 1:, 1:]  # [b, i, j]
    for s in range(1, 1 << m):
        members = bits[(s >> bits) & 1 == 1]
        if len(members) < 2:
            continue
        for j in members:
            prev = s ^ (1 << j)
            inside = bits[(prev >> bits) & 1 == 1]
            cost = dp[:, prev, inside] + dd[:, inside, j]  # [b, |prev|]
            k = np.argmin(cost, axis=1)
            dp[:, s, j] = cost[np.arange(b), k]
            parent[:, s, j] = inside[k]
    full = (1 << m) - 1
    total = dp[:, full, :] + d[:, 1:, 0]
    last = np.argmin(total, axis=1)
    lengths = total[np.arange(b), last]
    tours = np.zeros((b, n), np.int32)
    for i in range(b):
        s, j, seq = full, int(last[i]), []
        while s:
            seq.append(j + 1)
            s, j = s ^ (1 << j), int(parent[i, s, j])
        tours[i] = _canonical([0] + seq[::-1])
    return tours, lengths


def two_opt(pts, tour=None, max_rounds: int = 1000) -> list[int]:
    """A 2-opt local optimum from ``tour`` (default: the nearest-neighbour tour), canonical."""
    pts = _check_points("pts", pts)
    d = _distances(pts)
    t = np.array(nearest_neighbour_tour(pts) if tour is None else tour)
    n = len(t)
    for _ in range(max_rounds):
        a, b = t, np.roll(t, -1)
        # gain of reversing t[i+1..j]: d(a_i, b_i) + d(a_j, b_j) − d(a_i, a_j) − d(b_i, b_j)
        gain = d[a, b][:, None] + d[a, b][None, :] - d[a[:, None], a[None, :]] - d[b[:, None], b[None, :]]
        gain = np.triu(gain, 2)
        gain[0, n - 1] = 0.0
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[i, j] <= 1e-12:
            break
        t[i + 1 : j + 1] = t[i + 1 : j + 1][::-1]
    return _canonical(t.tolist())


def nearest_neighbour_tour(pts) -> list[int]:
    """Greedy tour from city 0, always to the closest unvisited city."""
    pts = _check_points("pts", pts)
    d = _distances(pts)
    tour, left = [0], set(range(1, len(pts)))
    while left:
        nxt = min(left, key=lambda j: d[tour[-1], j])
        tour.append(nxt)
        left.remove(nxt)
    return tour


def random_tour(pts, rng) -> list[int]:
    """A uniformly random tour from city 0."""
    n = len(_check_points("pts", pts))
    return [0] + list(rng.permutation(np.arange(1, n)))


def tsp(num: int, n=10, *, seed: int = 0, exact: bool | None = None) -> PointerBatch:
    """``num`` planar TSP instances with ``n`` cities (an int or ``(lo, hi)``) and their tours (targets ``[b, n_max]``).

    ``exact`` (default: ``n_max <= 10``) labels by Held–Karp, else by :func:`two_opt`.
    """
    rng = np.random.default_rng(seed)
    sizes = _sizes(rng, num, n, 3)
    pts, mask = _points(rng, sizes)
    exact = int(sizes.max()) <= EXACT_TSP_MAX if exact is None else exact
    targets = np.full((num, pts.shape[1]), IGNORE, np.int32)
    length = np.zeros(num)
    for m in np.unique(sizes):
        idx = np.flatnonzero(sizes == m)
        if exact:
            tours, lens = held_karp(pts[idx, :m])
        else:
            tours = np.array([two_opt(pts[i, :m]) for i in idx], np.int32)
            lens = np.array([tour_length(pts[i], t) for i, t in zip(idx, tours)])
        targets[idx, :m] = tours
        length[idx] = lens
    return PointerBatch(pts, mask, targets, {"length": length})
