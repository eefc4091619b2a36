"""What every partitioner returns, and the balanced k-means core shared by UBP / IBP / InBP / GraphEraser."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp


class PartitionError(ValueError):
    """A partitioner cannot satisfy its constraints (e.g. fewer points than shards)."""


@dataclass(frozen=True)
class Partition:
    """Shard id of every training interaction, in the row-major (CSR) order of the training matrix.

    ``assignment`` (nnz,) int64 in ``0..n_shards-1``; ``diagnostics`` holds sizes, users / items per shard,
    iterations, anchor shift per iteration and seconds.
    """

    method: str
    n_shards: int
    assignment: np.ndarray
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def shard_matrix(self, train: sp.csr_matrix, shard: int) -> sp.csr_matrix:
        """The training interactions of one shard, as a matrix of the full (n_users, n_items) shape."""
        if train.nnz != len(self.assignment):
            raise PartitionError(f"partition covers {len(self.assignment)} interactions, train has {train.nnz}")
        keep = (self.assignment == shard).astype(np.float32)
        m = sp.csr_matrix((keep, train.indices.copy(), train.indptr.copy()), shape=train.shape)
        m.eliminate_zeros()
        return m


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a fixed, well-spread hash of each value."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def route_validation(
    valid: sp.csr_matrix,
    train: sp.csr_matrix,
    assignment: np.ndarray,
    n_shards: int,
    seed: int = 0,
    only: np.ndarray | None = None,
) -> np.ndarray:
    """The one shard that early-stops on each validation entry (``valid``'s CSR order), or -1 for none.

    Candidates are the shards whose training data holds both the entry's user and its item (a shard model can
    only be judged on pairs it has seen both ends of); among them the entry goes to the shard with the highest
    seeded hash of (user, item, shard), rendezvous hashing. So the route depends only on the entry and on which
    shards hold its user and item: a deletion moves an entry only when the shard it was routed to loses the
    user's or the item's last training record there, and then only to another of its candidates.

    ``only`` (bool, one per entry): route those entries alone (the others read -1), each as it would be routed
    among all of them, for a caller that needs the routes of a few users' and items' entries."""
    if train.nnz != len(assignment):
        raise PartitionError(f"partition covers {len(assignment)} interactions, train has {train.nnz}")
    n_users, n_items = train.shape
    users = np.repeat(np.arange(n_users), np.diff(train.indptr))
    user_in = np.zeros((n_shards, n_users), dtype=bool)
    item_in = np.zeros((n_shards, n_items), dtype=bool)
    user_in[assignment, users] = True
    item_in[assignment, train.indices] = True
    rows = np.repeat(np.arange(n_users, dtype=np.uint64), np.diff(valid.indptr))
    cols = valid.indices.astype(np.uint64)
    picked = np.arange(len(cols)) if only is None else np.flatnonzero(only)
    rows, cols = rows[picked], cols[picked]
    with np.errstate(over="ignore"):
        base = _mix(rows * np.uint64(0x9E3779B97F4A7C15) ^ _mix(cols + np.uint64(seed) * np.uint64(0x632BE59BD9B4E019)))
        route = np.full(len(cols), -1, dtype=np.int64)
        best = np.zeros(len(cols), dtype=np.uint64)
        r, c = rows.astype(np.int64), cols.astype(np.int64)
        for k in range(n_shards):
            h = _mix(base ^ np.uint64(k + 1) * np.uint64(0xD1B54A32D192ED03))
            better = user_in[k, r] & item_in[k, c] & ((route < 0) | (h > best))
            route[better], best[better] = k, h[better]
    if only is None:
        return route
    out = np.full(valid.nnz, -1, dtype=np.int64)
    out[picked] = route
    return out


def routed_validation(valid: sp.csr_matrix, route: np.ndarray, shard: int) -> sp.csr_matrix:
    """The validation entries routed to ``shard`` (`route_validation`), as a matrix of ``valid``'s shape."""
    keep = (route == shard).astype(np.float32)
    m = sp.csr_matrix((keep, valid.indices.copy(), valid.indptr.copy()), shape=valid.shape)
    m.eliminate_zeros()
    m.sort_indices()
    return m


def describe(method: str, assignment: np.ndarray, train: sp.csr_matrix, n_shards: int, **extra: Any) -> dict[str, Any]:
    """Sizes and coverage of a partition of ``train``'s interactions."""
    users = np.repeat(np.arange(train.shape[0]), np.diff(train.indptr))
    sizes = np.bincount(assignment, minlength=n_shards)
    per_users = [int(len(np.unique(users[assignment == k]))) for k in range(n_shards)]
    per_items = [int(len(np.unique(train.indices[assignment == k]))) for k in range(n_shards)]
    return {
        "method": method,
        "n_shards": n_shards,
        "sizes": sizes.tolist(),
        "users_per_shard": per_users,
        "items_per_shard": per_items,
        "balance": float(sizes.max() / max(sizes.mean(), 1e-12)),  # max / mean shard size
        **extra,
    }


def _kth_by_distance_then_point(dc: np.ndarray, points: np.ndarray, kth: int) -> tuple[float, int]:
    """The (distance, point) pair at position ``kth`` (0-based) of the pairs sorted by distance, ties by point:
    a selection in linear time (np.partition), not a sort."""
    v = np.partition(dc, kth)[kth]
    less = int(np.count_nonzero(dc < v))
    tied = np.sort(points[dc == v])
    return float(v), int(tied[kth - less])


def greedy_balanced_assign(dist: np.ndarray, capacity: int) -> np.ndarray:
    """Nearest-first greedy assignment under a per-shard capacity, computed exactly and vectorised.

    Equivalent to: sort all (point, anchor) pairs by distance (ties by point index), walk the list and put a
    point into the pair's shard if the point is still unassigned and the shard holds fewer than ``capacity``.
    Instead of walking n*K pairs, it proceeds in at most K phases: every unassigned point proposes to its
    nearest open shard; the first shard to fill up (in the global order) closes; proposals ordered before
    that moment are accepted; repeat. Each phase is linear in the points: the moment a shard fills is its
    room-th proposal in (distance, point) order, found by selection, not by sorting the proposals.
    dist (n, K) -> shard ids (n,).
    """
    n, k = dist.shape
    if capacity * k < n:
        raise PartitionError(f"capacity {capacity} x {k} shards cannot hold {n} points")
    assigned = np.full(n, -1, dtype=np.int64)
    counts = np.zeros(k, dtype=np.int64)
    open_ = np.ones(k, dtype=bool)
    choice_all = np.argmin(dist, axis=1)  # every point's nearest open shard (kept up to date below)
    todo = np.arange(n)
    while len(todo):
        choice = choice_all[todo]
        dc = dist[todo, choice]
        n_prop = np.bincount(choice, minlength=k)
        room = capacity - counts
        filling = np.flatnonzero((n_prop > 0) & (n_prop >= room))  # shards that some proposal would fill
        if not len(filling):
            assigned[todo] = choice
            break
        # the moment each filling shard fills: its room-th proposal in (distance, point) order; the first
        # of those moments closes its shard
        moments = [_kth_by_distance_then_point(dc[choice == s], todo[choice == s], room[s] - 1) for s in filling]
        stop = min(range(len(filling)), key=lambda j: moments[j])
        (tau_d, tau_p), closing = moments[stop], int(filling[stop])
        accept = (dc < tau_d) | ((dc == tau_d) & (todo <= tau_p))
        assigned[todo[accept]] = choice[accept]
        counts += np.bincount(choice[accept], minlength=k)
        todo = todo[~accept]
        open_[closing] = False
        open_ &= counts < capacity
        moved = ~open_[choice_all[todo]]
        if moved.any():  # the points that proposed to a shard now closed propose to their next nearest
            rows = todo[moved]
            choice_all[rows] = np.argmin(np.where(open_[None, :], dist[rows], np.inf), axis=1)
    return assigned


def balanced_kmeans(
    distances: Callable[[np.ndarray], np.ndarray],
    init_anchors: np.ndarray,
    update: Callable[[np.ndarray, np.ndarray], np.ndarray],
    n_points: int,
    n_shards: int,
    capacity: int,
    max_iter: int,
    rng: np.random.Generator,
    callback: Callable[[dict[str, float]], None] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Generic balanced k-means loop (RecEraser Algorithm 1-3).

    ``distances(anchors)`` -> (n_points, K); ``update(assignment, anchors)`` -> new anchors (vector means of
    the members; an empty shard keeps its anchor). Stops when the assignment no longer changes or after
    ``max_iter`` iterations. Empty shards are re-seeded at a random member of the largest shard. ``callback``
    gets each iteration's number, how many points changed shard, and the seconds so far.
    """
    t0 = time.perf_counter()
    anchors = init_anchors
    assignment = np.full(n_points, -1, dtype=np.int64)
    shifts: list[float] = []
    iterations = 0
    for _ in range(max_iter):
        iterations += 1
        new = greedy_balanced_assign(distances(anchors), capacity)
        sizes = np.bincount(new, minlength=n_shards)
        converged = np.array_equal(new, assignment)
        moved = int((new != assignment).sum())
        assignment = new
        new_anchors = update(assignment, anchors)
        for empty in np.flatnonzero(sizes == 0):  # re-seed: never leave a shard without members
            donor = rng.choice(np.flatnonzero(assignment == np.argmax(sizes)))
            new_anchors[empty] = update(np.where(np.arange(n_points) == donor, empty, -1), new_anchors)[empty]
        shifts.append(float(np.sqrt(((new_anchors - anchors) ** 2).sum(axis=tuple(range(1, anchors.ndim)))).mean()))
        anchors = new_anchors
        if callback is not None:
            callback({"iteration": iterations, "moved": moved, "seconds": time.perf_counter() - t0})
        if converged and (sizes > 0).all():
            break
    sizes = np.bincount(assignment, minlength=n_shards)
    for empty in np.flatnonzero(sizes == 0):  # last resort: move the point nearest to the empty anchor
        largest = int(np.argmax(np.bincount(assignment, minlength=n_shards)))
        members = np.flatnonzero(assignment == largest)
        assignment[members[np.argmin(distances(anchors)[members, empty])]] = empty
    info = {"iterations": iterations, "anchor_shift": shifts, "capacity": capacity, "seconds": time.perf_counter() - t0}
    return assignment, info
