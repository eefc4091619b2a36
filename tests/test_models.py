"""One suite for every base model (BPR, WMF, LightGCN): quality on a known structure, determinism,
save / load, config errors, and that training reads nothing but its own matrix."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from receraser_core.aggregate import AggConfig
from receraser_core.data.interactions import Interactions, pairs_to_csr
from receraser_core.metrics import evaluate, popularity_scores, validation_users
from receraser_core.models import MODELS, ConfigError, build_model, load_model
from receraser_core.models.base import bpr_triples, l2_penalty, sample_negatives
from receraser_core.models.lightgcn import normalized_adjacency

FAST = {
    "bpr": {"dim": 16, "epochs": 40, "lr": 0.05, "batch_size": 64, "l2": 3e-2, "eval_every": 5},
    "wmf": {"dim": 16, "epochs": 8, "reg": 2.0, "c0": 0.2},
    "lightgcn": {"dim": 16, "epochs": 40, "lr": 0.05, "batch_size": 128, "l2": 1e-4, "eval_every": 5},
}


def _fit(name: str, data: Interactions, **overrides: object):
    model = build_model(name, data.n_users, data.n_items, **{**FAST[name], **overrides})
    result = model.fit(data.train, data.valid)
    return model, result


@pytest.mark.parametrize("name", list(MODELS))
def test_learns_block_structure(name: str, blocks: Interactions) -> None:
    model, result = _fit(name, blocks)
    got = evaluate(model.score, blocks.train, blocks.test, ks=(5,))
    baseline = evaluate(popularity_scores(blocks.train), blocks.train, blocks.test, ks=(5,))
    # 5 unmasked items are in each user's block, so a model that learned the blocks has Recall@5 near 1
    assert got["recall@5"] >= 0.85, (name, got, result.history[-3:])
    assert baseline["recall@5"] < 0.5
    assert result.best_epoch >= 1 and result.history


@pytest.mark.parametrize("name", list(MODELS))
def test_same_seed_same_parameters(name: str, blocks: Interactions) -> None:
    a, _ = _fit(name, blocks, seed=3, epochs=6)
    b, _ = _fit(name, blocks, seed=3, epochs=6)
    c, _ = _fit(name, blocks, seed=4, epochs=6)
    for key in a.params:
        assert torch.equal(a.params[key], b.params[key]), key
    assert any(not torch.equal(a.params[k], c.params[k]) for k in a.params)


@pytest.mark.parametrize("name", ["bpr", "lightgcn"])
@pytest.mark.parametrize("negatives", ["observed", "all"])
def test_training_only_reachable_rows_changes_nothing(
    name: str, negatives: str, blocks: Interactions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shard models train only the rows a triple can reach; the result must be bit-identical to training the
    full tables, and the unreachable rows must keep their initial values."""
    train = blocks.train.tolil()
    train[:4] = 0  # four users without items, as users outside a shard
    train[:, :3] = 0  # three items nobody has: unreachable when negatives are "observed"
    train = train.tocsr()
    train.eliminate_zeros()
    kw = {**FAST[name], "epochs": 6, "negatives": negatives, "seed": 2}
    compact = build_model(name, blocks.n_users, blocks.n_items, **kw)
    compact.fit(train, blocks.valid)
    full_rows = lambda m, _neg: (np.arange(m.shape[0]), np.arange(m.shape[1]))  # noqa: E731
    monkeypatch.setattr(f"receraser_core.models.{name}.reachable_rows", full_rows)
    full = build_model(name, blocks.n_users, blocks.n_items, **kw)
    full.fit(train, blocks.valid)
    start = build_model(name, blocks.n_users, blocks.n_items, **kw)
    start._init_params(train, torch.Generator().manual_seed(2))
    for key in full.params:
        assert torch.equal(compact.params[key], full.params[key]), key
    users = compact.params["embedding"][: blocks.n_users] if name == "lightgcn" else compact.params["user"]
    items = compact.params["embedding"][blocks.n_users :] if name == "lightgcn" else compact.params["item"]
    start_u = start.params["embedding"][: blocks.n_users] if name == "lightgcn" else start.params["user"]
    start_i = start.params["embedding"][blocks.n_users :] if name == "lightgcn" else start.params["item"]
    assert torch.equal(users[:4], start_u[:4]) and not torch.equal(users[4:], start_u[4:])
    assert torch.equal(items[:3], start_i[:3]) == (negatives == "observed")


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_round_trip(name: str, blocks: Interactions, tmp_path: Path) -> None:
    model, _ = _fit(name, blocks, epochs=3)
    model.save(tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert type(loaded) is type(model) and loaded.config == model.config
    users = torch.arange(blocks.n_users)
    assert torch.equal(loaded.score(users), model.score(users))


@pytest.mark.parametrize("name", list(MODELS))
def test_bad_config_and_inputs(name: str, blocks: Interactions) -> None:
    with pytest.raises(ConfigError, match="unknown"):
        build_model(name, 5, 5, learning_rate=0.1)
    with pytest.raises(ConfigError, match="dim must be >= 1"):
        build_model(name, 5, 5, dim=0)
    model = build_model(name, blocks.n_users, blocks.n_items, **FAST[name])
    with pytest.raises(ConfigError, match="shape"):
        model.fit(blocks.train[:-1])
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("svd", 5, 5)


@pytest.mark.parametrize("name", list(MODELS))
def test_shard_model_depends_only_on_its_shard(name: str, blocks: Interactions) -> None:
    """A shard model is a function of the shard matrix alone: same shard, different rest -> same model."""
    in_shard = np.arange(blocks.n_users) < 24  # users of blocks 0 and 1
    shard = sp.csr_matrix(sp.diags(in_shard.astype(np.float32)) @ blocks.train)
    shard.eliminate_zeros()
    assert 0 < shard.nnz < blocks.train.nnz
    a = build_model(name, blocks.n_users, blocks.n_items, **{**FAST[name], "epochs": 4})
    a.fit(shard, blocks.valid)
    # global random state a model must not read, and a model of the whole data trained in between
    torch.manual_seed(12345)
    np.random.seed(12345)  # noqa: NPY002 - the legacy global state is what is perturbed here
    build_model(name, blocks.n_users, blocks.n_items, **{**FAST[name], "epochs": 2}).fit(blocks.train, blocks.valid)
    rows, cols = shard.nonzero()  # the same shard, built anew from its pairs
    b = build_model(name, blocks.n_users, blocks.n_items, **{**FAST[name], "epochs": 4})
    b.fit(pairs_to_csr(rows, cols, *shard.shape), blocks.valid)
    for key in a.params:
        assert torch.equal(a.params[key], b.params[key])
    # users outside the shard never received a gradient or a solve from shard data
    user_emb, _ = a.layer0() if name == "lightgcn" else a.embeddings()
    fresh = build_model(name, blocks.n_users, blocks.n_items, **{**FAST[name], "epochs": 4})
    fresh._init_params(shard, torch.Generator().manual_seed(fresh.config.seed))
    fresh_users = fresh.params["embedding"][: blocks.n_users] if name == "lightgcn" else fresh.params["user"]
    # (WMF's ALS solves only the users and items the shard has, so its absent users keep their start too)
    assert torch.equal(user_emb[~torch.from_numpy(in_shard)], fresh_users.detach()[~torch.from_numpy(in_shard)])


def test_negative_sampling_avoids_the_users_positives_only() -> None:
    train = pairs_to_csr(np.array([0, 0, 0, 1]), np.array([0, 1, 2, 3]), 2, 5)
    rng = np.random.default_rng(0)
    users = np.repeat(np.array([0, 1]), 5000)
    neg = sample_negatives(train, users, rng)
    assert set(neg[users == 0].tolist()) == {3, 4}
    assert set(neg[users == 1].tolist()) == {0, 1, 2, 4}  # item 3 is user 1's only positive
    counts = np.bincount(neg[users == 1], minlength=5)[[0, 1, 2, 4]]
    assert counts.min() > 0.2 * 5000  # roughly uniform over the four candidates


def test_a_user_with_almost_every_candidate_item_still_gets_uniform_negatives_or_none() -> None:
    """A shard where a user holds all but one of its items (InBP at K = 20 on ML-1M had one): rejection sampling
    gives up, the user's complement is drawn from instead; a user holding every item gets no triple."""
    n_items = 400
    rows = np.r_[np.zeros(n_items - 1, dtype=np.int64), np.ones(n_items, dtype=np.int64), [2]]
    cols = np.r_[np.arange(n_items - 1), np.arange(n_items), [0]]
    train = pairs_to_csr(rows, cols, 3, n_items)
    users = np.array([0, 0, 1, 2, 2])
    neg = sample_negatives(train, users, np.random.default_rng(0), max_rounds=2)
    assert neg[:2].tolist() == [n_items - 1, n_items - 1] and neg[2] == -1 and 0 not in neg[3:].tolist()
    u, i, j = bpr_triples(train, np.random.default_rng(0), torch.device("cpu"), sampling="interaction")
    assert len(u) == train.nnz - n_items and 1 not in u.tolist()
    assert not train[u.numpy().copy(), j.numpy().copy()].any()


def test_negatives_are_the_same_with_the_lookup_table_or_the_binary_search(monkeypatch) -> None:
    """Small catalogues check candidates in a dense table of (user, item) cells, large ones by binary search in the
    sorted keys: the same draws either way."""
    import receraser_core.models.base as base

    rng = np.random.default_rng(4)
    train = sp.csr_matrix(rng.random((50, 40)) < 0.4, dtype=np.float32)
    users = rng.integers(0, 50, 3000)
    table = sample_negatives(train, users, np.random.default_rng(8))
    monkeypatch.setattr(base, "DENSE_SEEN_LIMIT", 0)
    assert np.array_equal(table, sample_negatives(train, users, np.random.default_rng(8)))
    assert not train[users, table].any()


def test_observed_negatives_come_from_the_training_datas_items_only() -> None:
    # items 3 and 5 never occur in this (shard's) data: "observed" never draws them, "all" does
    train = pairs_to_csr(np.array([0, 0, 1, 2]), np.array([0, 1, 2, 4]), 3, 6)
    users = np.repeat(np.array([0, 1, 2]), 3000)
    neg = sample_negatives(train, users, np.random.default_rng(0), negatives="observed")
    assert set(neg[users == 0].tolist()) == {2, 4}
    assert set(neg[users == 1].tolist()) == {0, 1, 4}
    assert set(neg[users == 2].tolist()) == {0, 1, 2}
    assert {3, 5} <= set(sample_negatives(train, users, np.random.default_rng(0)).tolist())
    # where every item occurs in the data, both modes draw the very same samples
    full = pairs_to_csr(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 2, 3, 4]), 3, 5)
    a = sample_negatives(full, users, np.random.default_rng(1), negatives="observed")
    assert np.array_equal(a, sample_negatives(full, users, np.random.default_rng(1)))
    with pytest.raises(ValueError, match="negatives must be one of"):
        sample_negatives(full, users, np.random.default_rng(1), negatives="popular")
    for name in ("bpr", "lightgcn"):
        with pytest.raises(ConfigError, match="negatives must be one of"):
            build_model(name, 3, 5, negatives="popular")


def test_l2_per_row_counts_each_distinct_row_once() -> None:
    table = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    idx = torch.tensor([1, 1, 1, 0])  # row 1 (norm^2 4) three times, row 0 (norm^2 1) once
    assert float(l2_penalty(4, "occurrence", (table, idx))) == (3 * 4 + 1) / 4
    assert float(l2_penalty(4, "row", (table, idx))) == (4 + 1) / 4
    # two lookups into different tables add up; row 2 is never touched
    assert float(l2_penalty(2, "row", (table, idx), (table * 2, torch.tensor([0, 0])))) == (5 + 4) / 2
    for name in ("bpr", "lightgcn"):
        with pytest.raises(ConfigError, match="l2_per must be one of"):
            build_model(name, 3, 5, l2_per="unique")
        # the two modes train different models from the same seed (the penalty really is applied)
        data = pairs_to_csr(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 3]), 3, 5)
        a = build_model(name, 3, 5, dim=4, epochs=3, batch_size=4, l2=0.5, lr=0.05, l2_per="occurrence")
        b = build_model(name, 3, 5, dim=4, epochs=3, batch_size=4, l2=0.5, lr=0.05, l2_per="row")
        a.fit(data)
        b.fit(data)
        assert not torch.equal(a.embeddings()[1], b.embeddings()[1]), name


def test_user_sampling_weighs_every_user_alike() -> None:
    """sampling="user": nnz triples, users uniform among those with items (one heavy user, three light ones),
    each positive one of that user's own items, each negative none of them; "interaction": every pair once."""
    users = np.array([0] * 40 + [1, 2, 4])
    items = np.array(list(range(40)) + [40, 41, 42])
    train = pairs_to_csr(users, items, 5, 50)  # user 3 has no item: never drawn
    u, i, j = (t.numpy() for t in bpr_triples(train, np.random.default_rng(0), torch.device("cpu"), sampling="user"))
    assert len(u) == train.nnz
    counts = np.bincount(u, minlength=5)
    assert counts[3] == 0 and counts[0] < 20  # interaction sampling would give user 0 40 of the 43 draws
    dense = train.toarray()
    assert dense[u, i].all() and not dense[u, j].any()
    u2, i2, _ = (t.numpy() for t in bpr_triples(train, np.random.default_rng(0), torch.device("cpu")))
    assert sorted(zip(u2, i2, strict=True)) == sorted(zip(users, items, strict=True))
    same = bpr_triples(train, np.random.default_rng(0), torch.device("cpu"), sampling="user")
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(same, (u, i, j), strict=True))
    with pytest.raises(ConfigError, match="sampling must be one of"):
        build_model("bpr", 3, 5, sampling="users")
    with pytest.raises(ConfigError, match="sampling must be one of"):
        bpr_triples(train, np.random.default_rng(0), torch.device("cpu"), sampling="pairs")
    with pytest.raises(ConfigError, match="sampling must be one of"):
        AggConfig(sampling="pairs")
    # the two samplers train different models from the same seed
    a = build_model("bpr", 5, 50, dim=4, epochs=2, batch_size=8, sampling="user")
    b = build_model("bpr", 5, 50, dim=4, epochs=2, batch_size=8, sampling="interaction")
    a.fit(train)
    b.fit(train)
    assert not torch.equal(a.embeddings()[0], b.embeddings()[0])


def test_lightgcn_adjacency_is_symmetric_normalised() -> None:
    train = pairs_to_csr(np.array([0, 0, 1]), np.array([0, 1, 1]), 3, 3)  # user 2 and item 2 isolated
    adj = normalized_adjacency(train).toarray()
    assert np.allclose(adj, adj.T)
    # edge (user 0, item 1): deg(user 0) = 2, deg(item 1) = 2 -> 1/2
    assert adj[0, 3 + 1] == pytest.approx(0.5)
    assert adj[0, 3 + 0] == pytest.approx(1 / np.sqrt(2))
    assert not adj[2].any() and not adj[5].any()


def test_wmf_als_solves_the_weighted_objective(blocks: Interactions) -> None:
    """After an ALS sweep the item factors satisfy the normal equations of the documented objective:
    (c0 PᵀP + (1 - c0) Σ_{u∈R_i} p_u p_uᵀ + reg I) q_i = Σ_{u∈R_i} p_u."""
    c0, reg = 0.1, 0.5
    model = build_model(
        "wmf", blocks.n_users, blocks.n_items, dim=8, epochs=3, eval_every=1, c0=c0, reg=reg, patience=10, cg=False
    )
    model.fit(blocks.train)  # no validation: keeps the last sweep (the loss only decreases)
    p = model.params["user"].double().numpy()
    q = model.params["item"].double().numpy()
    r = blocks.train.tocsc()
    for i in range(blocks.n_items):
        users = r.indices[r.indptr[i] : r.indptr[i + 1]]
        pu = p[users]
        a = c0 * p.T @ p + (1 - c0) * pu.T @ pu + reg * np.eye(8)
        assert np.allclose(a @ q[i], pu.sum(0), atol=1e-3)


def test_wmf_enmf_solver_decreases_the_same_loss(blocks: Interactions) -> None:
    model = build_model(
        "wmf",
        blocks.n_users,
        blocks.n_items,
        dim=16,
        epochs=30,
        solver="enmf",
        lr=0.05,
        batch_size=16,
        c0=0.2,
        reg=2.0,
        patience=30,
    )
    result = model.fit(blocks.train)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    got = evaluate(model.score, blocks.train, blocks.test, ks=(5,))
    assert got["recall@5"] >= 0.8


def test_wmf_cg_reaches_the_cholesky_solution_and_ignores_thread_counts(blocks: Interactions) -> None:
    """The conjugate-gradient sweeps (the default) minimise the same objective as the exact Cholesky ones, and
    the factors are bit-identical whatever implicit's thread count."""
    kw = {"dim": 8, "epochs": 40, "eval_every": 40, "c0": 0.1, "reg": 0.5}
    exact = build_model("wmf", blocks.n_users, blocks.n_items, cg=False, **kw)
    exact.fit(blocks.train)
    fits = [build_model("wmf", blocks.n_users, blocks.n_items, threads=t, **kw) for t in (1, 2)]
    for m in fits:
        m.fit(blocks.train)
    assert all(torch.equal(fits[0].params[k], fits[1].params[k]) for k in ("user", "item"))
    # the objective (negative here: the constant |R| is left out) agrees to 1e-5 relative after 40 sweeps
    got, want = float(fits[0].objective(blocks.train)), float(exact.objective(blocks.train))
    assert abs(got - want) <= 1e-5 * abs(want)


def test_wmf_shard_fit_solves_only_the_rows_it_has(blocks: Interactions) -> None:
    """A user or item without an interaction in the training matrix is not solved: it keeps its seeded start."""
    train = blocks.train.tolil()
    train[:12, :] = 0  # block 0's users leave, and with them every interaction of block 0's items
    train = sp.csr_matrix(train)
    train.eliminate_zeros()
    kw = {"dim": 8, "epochs": 6, "eval_every": 6, "seed": 3}
    model = build_model("wmf", blocks.n_users, blocks.n_items, **kw)
    model.fit(train)
    start = build_model("wmf", blocks.n_users, blocks.n_items, **{**kw, "epochs": 1})
    start._init_params(train, torch.Generator().manual_seed(3))  # the seeded start
    assert torch.equal(model.params["user"][:12], start.params["user"][:12])
    assert torch.equal(model.params["item"][:10], start.params["item"][:10])
    assert not torch.equal(model.params["user"][12:], start.params["user"][12:])
    assert not torch.equal(model.params["item"][10:], start.params["item"][10:])


def test_wmf_loss_sparse_products_match_the_gathered_form(blocks: Interactions) -> None:
    """`wmf_loss` scores the observed entries with sparse products; value and gradients equal the plain
    gathered form sum_(u,i)[(1 - c0) r_ui^2 - 2 r_ui] + c0 sum(PᵀP ⊙ QᵀQ)."""
    from receraser_core.models.wmf import Observed, wmf_loss

    g = torch.Generator().manual_seed(0)
    rows = np.arange(5, 30)  # a user batch
    block = blocks.train[rows]
    p = torch.randn(len(rows), 8, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(blocks.n_items, 8, generator=g, dtype=torch.float64, requires_grad=True)
    got = wmf_loss(p, q, Observed.of(block), 0.2)
    gp, gq = torch.autograd.grad(got, (p, q))
    coo = block.tocoo()
    r = (p[torch.from_numpy(coo.row).long()] * q[torch.from_numpy(coo.col).long()]).sum(-1)
    want = 0.2 * torch.sum((p.t() @ p) * (q.t() @ q)) + torch.sum(0.8 * r.square() - 2 * r)
    wp, wq = torch.autograd.grad(want, (p, q))
    assert torch.allclose(got, want) and torch.allclose(gp, wp) and torch.allclose(gq, wq)


def test_triple_loss_matches_the_gathered_bpr_loss() -> None:
    """`triple_loss` writes its gradient into the tables' rows itself; value and gradients equal autograd's
    through the gathered form, also when users and items are one table (LightGCN) and rows repeat."""
    from receraser_core.models.bpr import bpr_loss, triple_loss

    g = torch.Generator().manual_seed(0)
    users = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    items = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    u, i, j = (torch.randint(0, n, (40,), generator=g) for n in (7, 9, 9))
    got = triple_loss(users, items, u, i, j)
    want = bpr_loss((users[u] * items[i]).sum(-1), (users[u] * items[j]).sum(-1))
    assert torch.allclose(got, want)
    for a, b in zip(torch.autograd.grad(got, (users, items)), torch.autograd.grad(want, (users, items)), strict=True):
        assert torch.allclose(a, b)
    assert torch.autograd.gradcheck(lambda a, b: triple_loss(a, b, u, i, j), (users, items))
    both = torch.cat([users, items]).detach().requires_grad_()
    (got_grad,) = torch.autograd.grad(triple_loss(both, both, u, i + 7, j + 7), both)
    (want_grad,) = torch.autograd.grad(bpr_loss((both[u] * both[i + 7]).sum(-1), (both[u] * both[j + 7]).sum(-1)), both)
    assert torch.allclose(got_grad, want_grad)


@pytest.mark.parametrize("l2_per", ["occurrence", "row"])
def test_bpr_grads_match_autograd_of_the_loss_and_penalty(l2_per: str) -> None:
    """`bpr_grads` writes the BPR step's gradient without autograd; it equals backpropagating `triple_loss` plus
    `l2_penalty`, rows repeated and rows unused alike, and returns the same loss."""
    from receraser_core.models.base import l2_penalty
    from receraser_core.models.bpr import bpr_grads, triple_loss

    g = torch.Generator().manual_seed(1)
    users = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    items = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    u, i, j = (torch.randint(0, n, (40,), generator=g) for n in (6, 8, 8))  # the last row of each unused
    want = triple_loss(users, items, u, i, j) + 0.3 * l2_penalty(40, l2_per, (users, u), (items, torch.cat([i, j])))
    wu, wi = torch.autograd.grad(want, (users, items))
    loss = bpr_grads(users, items, u, i, j, 0.3, l2_per, need_loss=True)
    assert users.grad is not None and items.grad is not None
    assert torch.allclose(users.grad, wu) and torch.allclose(items.grad, wi)
    assert not users.grad[6].any() and not items.grad[8].any()
    assert loss == pytest.approx(float(want))
    assert math.isnan(bpr_grads(users, items, u, i, j, 0.3, l2_per))


def test_valid_items_trained_ranks_among_the_models_items_and_rejects_unknown_values() -> None:
    """``valid_items="trained"``: early stopping ranks only the items with training data in the model's matrix;
    an item it never trained cannot be a validation hit. Any other value is one clear error."""
    train = pairs_to_csr(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 2, 0]), 3, 5)
    valid = pairs_to_csr(np.array([0, 1, 2]), np.array([2, 4, 3]), 3, 5)  # item 4 and 3 were never trained
    model = build_model("bpr", 3, 5, epochs=1, valid_items="trained")
    model.fit(train)
    with torch.no_grad():
        model.params["item"][3:] = 100.0  # untrained items would top every ranking of all items
    assert model.validation_recall(train, valid) == pytest.approx(1 / 3)  # only user 0's item 2 can be found
    everything = build_model("bpr", 3, 5, epochs=1)
    everything.fit(train)
    with torch.no_grad():
        everything.params["item"][:] = model.params["item"]
        everything.params["user"][:] = model.params["user"].abs() + 1.0
        model.params["user"][:] = everything.params["user"]
    assert everything.validation_recall(train, valid) > model.validation_recall(train, valid)
    with pytest.raises(ConfigError, match="valid_items must be one of"):
        build_model("bpr", 3, 5, valid_items="some")


def test_early_stopping_validates_a_fixed_hashed_subset_of_users_above_the_cap() -> None:
    """Above ``valid_users`` users, validation Recall@10 is that of a fixed subset (the same for every model on
    the data, each user in or out by its own index alone); at or below it, every user."""
    assert validation_users(6040, 10_000) is None and validation_users(100, 0) is None
    chosen = validation_users(70_000, 10_000)
    assert chosen is not None and 9_000 < len(chosen) < 11_000
    assert np.array_equal(chosen, validation_users(70_000, 10_000))  # fixed
    # a user's membership depends on its index alone: the first 50,000 users' are the same with 20,000 more
    wider = validation_users(50_000, int(10_000 * 50_000 / 70_000))
    assert wider is not None and len(np.setxor1d(wider, chosen[chosen < 50_000])) <= 2
    rng = np.random.default_rng(0)
    n_users, n_items = 400, 30
    train = pairs_to_csr(rng.integers(0, n_users, 3000), rng.integers(0, n_items, 3000), n_users, n_items)
    valid = pairs_to_csr(np.arange(n_users), rng.integers(0, n_items, n_users), n_users, n_items)
    model = build_model("bpr", n_users, n_items, epochs=1, valid_users=100)
    model.fit(train)
    users = validation_users(n_users, 100)
    with torch.no_grad():
        expected = evaluate(model.scorer(), train, valid, ks=(10,), users=users)["recall@10"]
        everyone = evaluate(model.scorer(), train, valid, ks=(10,))["recall@10"]
    assert model.validation_recall(train, valid) == pytest.approx(expected) != pytest.approx(everyone)
