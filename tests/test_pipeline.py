"""The plain-Python pipeline steps on a small synthetic dataset: each step alone, determinism, parallel
shard training, and the aggregators' masking rule."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydantic
import pytest
import scipy.sparse as sp
import torch

from pipelines.config import PipelineConfig
from pipelines.steps import (
    RunDir,
    aggregate,
    evaluate_run,
    load_aggregator,
    load_interactions,
    load_partition,
    load_serving,
    partition,
    prepare,
    pretrain,
    shard_train_matrix,
    train_shards,
)
from receraser_core.aggregate import AGGREGATORS, AggConfig, ShardStack
from receraser_core.data.interactions import DataError
from receraser_core.metrics import DEFAULT_KS, evaluate
from receraser_core.models import ConfigError, load_model

FAST_MODEL = {
    "wmf": {"dim": 8, "epochs": 5, "reg": 1.0},
    "bpr": {"dim": 8, "epochs": 6, "lr": 0.05, "batch_size": 128, "eval_every": 2},
    "lightgcn": {"dim": 8, "epochs": 6, "lr": 0.05, "batch_size": 256, "eval_every": 2},
}


def write_blocks_csv(path: Path, n_blocks: int = 3, users: int = 15, items: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(n_blocks):
        for u in range(users):
            for i in range(items):
                if rng.random() < 0.6:
                    rows.append((f"u{b * users + u}", 1000 + b * items + i))
    path.write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in rows))
    return path


def _config(tmp_path: Path, **kw: object) -> PipelineConfig:
    model = str(kw.pop("model", "wmf"))
    base = {
        "dataset": f"csv:{write_blocks_csv(tmp_path / 'blocks.csv')}",
        "model": model,
        "n_shards": 3,
        "model_overrides": FAST_MODEL[model],
        "agg_overrides": {"epochs": 3},
        "partition_iters": 5,
    }
    return PipelineConfig.from_dict({**base, **kw})


def _run_all(run: RunDir, cfg: PipelineConfig, workers: int = 1) -> dict[str, float]:
    prepare(run, cfg)
    pretrain(run, cfg)
    partition(run, cfg)
    train_shards(run, cfg, workers=workers)
    aggregate(run, cfg)
    return evaluate_run(run, cfg)


@pytest.mark.parametrize(
    ("model", "partitioner", "aggregator"),
    [
        ("wmf", "inbp", "attention"),
        ("bpr", "random", "mean"),
        ("lightgcn", "graph_eraser", "static"),
        ("lightgcn", "ubp", "attention"),
        ("wmf", "ibp", "static"),
    ],
)
def test_steps_end_to_end(tmp_path: Path, model: str, partitioner: str, aggregator: str) -> None:
    cfg = _config(tmp_path, model=model, partitioner=partitioner, aggregator=aggregator)
    run = RunDir(tmp_path / "run")
    metrics = _run_all(run, cfg)
    # the stored figures are what the serving model scores, recomputed here from its snapshot
    agg, train = load_serving(run)
    again = evaluate(agg.scorer(), train, load_interactions(run.interactions).test, ks=DEFAULT_KS, batch_size=256)
    assert metrics["recall@20"] == again["recall@20"] and metrics["ndcg@20"] == again["ndcg@20"]
    assert metrics["recall@20"] > 0 and metrics["test_users"] > 0
    for path in (run.interactions, run.embeddings, run.assignment, run.aggregator, run.evaluation):
        assert path.exists(), path
    inter = load_interactions(run.interactions)
    part = load_partition(run)
    assert len(part.assignment) == inter.train.nnz
    # every shard model was trained on exactly its shard
    for k in range(cfg.n_shards):
        assert load_model(run.shard_model(k)).n_users == inter.n_users
        assert shard_train_matrix(run, k).nnz == int((part.assignment == k).sum())


def test_blocks_are_learned_by_receraser(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path, model="wmf", partitioner="inbp", aggregator="attention", agg_overrides={"epochs": 10, "reg": 0.5}
    )
    metrics = _run_all(RunDir(tmp_path / "run"), cfg)
    assert metrics["recall@10"] > 0.8  # 12 items per block: the test items rank inside the user's block


def test_same_config_same_models_and_parallel_equals_sequential(tmp_path: Path) -> None:
    cfg = _config(tmp_path, model="bpr", partitioner="inbp", aggregator="attention")
    a, b = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    ma = _run_all(a, cfg, workers=1)
    mb = _run_all(b, cfg, workers=2)
    assert ma["recall@20"] == mb["recall@20"]
    for k in range(cfg.n_shards):
        pa, pb = load_model(a.shard_model(k)).params, load_model(b.shard_model(k)).params
        assert all(torch.equal(pa[n], pb[n]) for n in pa)
    sa, sb = load_aggregator(a, cfg).state_dict(), load_aggregator(b, cfg).state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)


def test_steps_need_their_inputs(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    run = RunDir(tmp_path / "empty")
    with pytest.raises(DataError, match="interactions.npz: interactions file is missing"):
        pretrain(run, cfg)
    prepare(run, cfg)
    with pytest.raises(DataError, match="missing"):
        aggregate(run, cfg)


def test_bad_pipeline_config() -> None:
    with pytest.raises(ConfigError, match="unknown partitioner"):
        PipelineConfig.from_dict({"partitioner": "kmeans"})
    with pytest.raises(ConfigError, match="unknown pipeline field"):
        PipelineConfig.from_dict({"shards": 3})
    # a config is valid once built: overrides are checked against the model's and the aggregator's fields
    for values, needle in (
        ({"agg_overrides": {"momentum": 0.9}}, "unknown aggregator field"),
        ({"model": "bpr", "model_overrides": {"lr": -0.01}}, "need lr > 0"),
        ({"model": "bpr", "model_overrides": {"learning_rate": 0.01}}, "unknown BPRConfig field"),
        ({"agg_overrides": {"lr": "fast"}}, "AggConfig.lr must be a number"),
        ({"n_shards": 1}, "n_shards must be between 2 and 1024, got 1"),
        ({"seed": -1}, "seeds must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=needle) as err:
            PipelineConfig.from_dict(values)
        assert "\n" not in str(err.value)
    with pytest.raises(pydantic.ValidationError):
        PipelineConfig(agg_overrides={"momentum": 0.9})


def test_absent_users_get_no_attention_and_no_mean_weight() -> None:
    d = 4
    users = torch.randn(2, 3, d)
    items = torch.randn(2, 5, d)
    present_u = torch.tensor([[True, True, False], [True, False, True]])
    present_i = torch.ones(2, 5, dtype=torch.bool)
    stack = ShardStack.restore(
        {"users": users * present_u[..., None], "items": items, "user_mask": present_u, "item_mask": present_i}
    )
    att = AGGREGATORS["attention"](stack, AggConfig())
    with torch.no_grad():
        e2 = att.user_embed(torch.tensor([2]))  # user 2 is only in shard 1
        expected = att._transfer(stack.users[:, [2]])[1]
    assert torch.allclose(e2, expected)
    mean = AGGREGATORS["mean"](stack, AggConfig())
    s = mean.score(torch.tensor([1]))  # user 1 only in shard 0: its mean is shard 0's score alone
    assert torch.allclose(s, stack.users[0, [1]] @ stack.items[0].t())


def test_packed_attention_equals_the_dense_masked_form() -> None:
    """The aggregator transfers and attends only over present (shard, row) pairs; the result and its gradients
    must be those of the dense form (transfer all K shard vectors, mask absent shards out of the softmax)."""
    g = torch.Generator().manual_seed(5)
    k, n_u, n_i, d = 4, 30, 20, 8
    um, im = torch.rand(k, n_u, generator=g) < 0.5, torch.rand(k, n_i, generator=g) < 0.4
    um[:, 7] = False  # a user in no shard: zeros, as in the dense form
    uc, ic = um * torch.randint(1, 9, (k, n_u), generator=g), im * torch.randint(1, 9, (k, n_i), generator=g)
    stack = ShardStack(
        torch.randn(k, n_u, d, generator=g) * um[..., None],
        torch.randn(k, n_i, d, generator=g) * im[..., None],
        um,
        im,
        uc.float(),
        ic.float(),
    )
    att = AGGREGATORS["attention"](stack, AggConfig())
    idx = torch.tensor([3, 7, 0, 3, 29, 12])  # repeats and the absent user included
    weight = torch.randn(len(idx), d, generator=g)

    def grads(embed: torch.Tensor) -> dict[str, torch.Tensor]:
        att.zero_grad()
        (embed * weight).sum().backward()
        return {n: p.grad.clone() for n, p in att.named_parameters() if p.grad is not None}

    packed = att.user_embed(idx)
    g_packed = grads(packed)
    dense = att.user_att(att._transfer(stack.users[:, idx]), um[:, idx], stack.user_count[:, idx])
    g_dense = grads(dense)
    assert torch.allclose(packed, dense, atol=1e-6) and torch.equal(packed[1], torch.zeros(d))
    assert set(g_packed) == set(g_dense) >= {"transfer_w", "transfer_b", "user_att.gamma", "user_att.mlp.0.weight"}
    for name in g_dense:
        assert torch.allclose(g_packed[name], g_dense[name], atol=1e-5), name
    items = torch.arange(n_i)
    dense_items = att.item_att(att._transfer(stack.items), im, stack.item_count)
    assert torch.allclose(att.item_embed(items), dense_items, atol=1e-6)


def _random_rotation(d: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def test_aligned_start_undoes_each_shards_rotation() -> None:
    from receraser_core.aggregate.attention import align_rotations

    g = torch.Generator().manual_seed(3)
    d, k_shards, n_u, n_i = 6, 3, 40, 30
    base_u, base_i = torch.randn(n_u, d, generator=g), torch.randn(n_i, d, generator=g)
    rots = [_random_rotation(d, g) for _ in range(k_shards)]
    um = torch.rand(k_shards, n_u, generator=g) < 0.7  # each shard sees a different subset
    im = torch.rand(k_shards, n_i, generator=g) < 0.7
    users = torch.stack([base_u @ q for q in rots]) * um[..., None]
    items = torch.stack([base_i @ q for q in rots]) * im[..., None]
    stack = ShardStack(users, items, um, im, um.float(), im.float())
    r = align_rotations(stack)
    eye = torch.eye(d).expand(k_shards, d, d)
    assert torch.allclose(r.transpose(1, 2) @ r, eye, atol=1e-5)  # orthogonal: each shard's own scores kept
    aligned = torch.bmm(users, r)
    for k in range(1, k_shards):  # after alignment the shards agree wherever both are present
        both = um[0] & um[k]
        assert torch.allclose(aligned[0][both], aligned[k][both], atol=1e-4)
    # without the alignment they do not
    both = um[0] & um[1]
    assert not torch.allclose(users[0][both], users[1][both], atol=1e-1)


def test_count_prior_weights_shards_by_interactions_at_start() -> None:
    d = 4
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(2, 1, d, generator=g), torch.randn(2, 2, d, generator=g)
    ones = torch.ones(2, 1, dtype=torch.bool)
    counts = torch.tensor([[1.0], [3.0]])  # the user has 1 interaction in shard 0 and 3 in shard 1
    stack = ShardStack(users, items, ones, torch.ones(2, 2, dtype=torch.bool), counts, torch.ones(2, 2))
    att = AGGREGATORS["attention"](stack, AggConfig(align_init=False))
    with torch.no_grad():
        att.user_att.mlp[2].weight.zero_()  # silence the learned part: only the prior is left
        att.user_att.mlp[2].bias.zero_()
        x = att._transfer(stack.users[:, [0]])
        assert torch.allclose(att.user_embed(torch.tensor([0])), 0.25 * x[0] + 0.75 * x[1], atol=1e-6)
        no_prior = AGGREGATORS["attention"](stack, AggConfig(align_init=False, count_prior=False))
        no_prior.user_att.mlp[2].weight.zero_()
        no_prior.user_att.mlp[2].bias.zero_()
        x = no_prior._transfer(stack.users[:, [0]])
        assert torch.allclose(no_prior.user_embed(torch.tensor([0])), 0.5 * x[0] + 0.5 * x[1], atol=1e-6)


def test_shard_validation_keeps_pairs_inside_the_shard() -> None:
    from pipelines.steps import shard_validation
    from receraser_core.data.interactions import pairs_to_csr

    shard = pairs_to_csr(np.array([0, 0, 1]), np.array([0, 1, 2]), 3, 4)
    valid = pairs_to_csr(np.array([0, 1, 1, 2]), np.array([2, 0, 3, 0]), 3, 4)
    got = shard_validation(valid, shard)
    # (0, 2): user 0 and item 2 both in the shard; (1, 0) too; (1, 3): item 3 absent; (2, 0): user 2 absent
    assert sorted(zip(*got.nonzero(), strict=True)) == [(0, 2), (1, 0)]


def _masked_stack(g: torch.Generator, k: int, n_u: int, n_i: int, d: int, p_user: float, p_item: float) -> ShardStack:
    """Random shard embeddings; a user (item) is in a shard with probability p_user (p_item), counted once."""
    um, im = torch.rand(k, n_u, generator=g) < p_user, torch.rand(k, n_i, generator=g) < p_item
    users, items = torch.randn(k, n_u, d, generator=g), torch.randn(k, n_i, d, generator=g)
    return ShardStack(users * um[..., None], items * im[..., None], um, im, um.float(), im.float())


def test_restored_aggregator_scores_like_the_saved_one_without_redoing_its_start(monkeypatch) -> None:
    """Loading a trained aggregator (evaluation, serving) must give its exact scores; the Procrustes start
    (``align_init``) only matters before training, so a restore must not pay for it again."""
    g = torch.Generator().manual_seed(2)
    n_u = 12
    stack = _masked_stack(g, k=3, n_u=n_u, n_i=9, d=4, p_user=0.7, p_item=0.6)
    trained = AGGREGATORS["attention"](stack, AggConfig(seed=4))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))  # any state other than a fresh start

    def no_procrustes(*_: object) -> torch.Tensor:
        raise AssertionError("align_rotations ran while restoring a trained aggregator")

    monkeypatch.setattr("receraser_core.aggregate.attention.align_rotations", no_procrustes)
    restored = AGGREGATORS["attention"].restore(stack, trained.config, trained.state_dict())
    assert restored.config == trained.config  # align_init=True is still what the model was trained with
    users = torch.arange(n_u)
    with torch.no_grad():
        assert torch.equal(restored.score(users), trained.score(users))


@pytest.mark.parametrize("loss", ["bpr", "wmf"])
def test_weight_average_is_what_the_aggregator_validates_and_keeps(loss: str) -> None:
    """With ``ema`` the aggregator validates, selects and returns the moving average of its weights over epochs
    (avg <- ema * avg + (1 - ema) * weights after the epoch), while training itself goes on from the raw weights."""
    g = torch.Generator().manual_seed(3)
    k, n_u, n_i, d = 3, 40, 30, 6
    rng = np.random.default_rng(3)
    block = (np.arange(n_u)[:, None] % 2) == (np.arange(n_i)[None, :] % 2)  # two communities to learn
    draw = rng.random((n_u, n_i))
    train = sp.csr_matrix(block & (draw < 0.5), dtype=np.float32)
    valid = sp.csr_matrix(block & (draw >= 0.5) & (draw < 0.7), dtype=np.float32)
    stack = _masked_stack(g, k, n_u, n_i, d, p_user=0.8, p_item=0.8)
    cfg = AggConfig(loss=loss, epochs=6, patience=6, lr=0.05, batch_size=256, ema=0.7, seed=1)
    agg = AGGREGATORS["attention"](stack, cfg)
    raw: list[dict[str, torch.Tensor]] = []
    agg_fit = agg.fit(train, valid, callback=lambda _: raw.append({k: v.clone() for k, v in agg.state_dict().items()}))
    averages, avg = [], None
    for state in raw:
        avg = state if avg is None else {k: 0.7 * avg[k] + 0.3 * state[k] for k in state}
        averages.append(avg)
    assert agg_fit.best_epoch > 1, agg_fit.history  # else the kept average would be one raw epoch
    check = AGGREGATORS["attention"].restore(stack, cfg, averages[agg_fit.best_epoch - 1])
    for name, value in agg.state_dict().items():
        assert torch.equal(value, averages[agg_fit.best_epoch - 1][name]), name
    assert not torch.equal(raw[-1]["transfer_w"], averages[-1]["transfer_w"])  # the average is not the last step
    for epoch, (log, state) in enumerate(zip(agg_fit.history, averages, strict=True), start=1):
        check.load_state_dict(state)
        assert log["valid_recall@10"] == evaluate(check.scorer(), train, valid, ks=(10,))["recall@10"], epoch
    plain, plain_raw = AGGREGATORS["attention"](stack, replace(cfg, ema=0.0)), []
    plain.fit(train, valid, callback=lambda _: plain_raw.append({k: v.clone() for k, v in plain.state_dict().items()}))
    for a, b in zip(raw, plain_raw, strict=True):  # averaging only reads the weights: training is the same
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="ema"):
        AggConfig(ema=1.0)


@pytest.mark.parametrize(("reg", "dense"), [(0.0, True), (0.01, True), (0.01, False)])
def test_user_block_step_equals_the_triple_step(reg: float, dense: bool, monkeypatch) -> None:
    """With ``user_blocks`` a BPR aggregator step scores a block of users against every item and reads the
    triples' entries; with one block (every user) it is the same step as the gathered triple loss on the same
    triples: same loss and, after one Adam step, the same weights; so is its sparse-data form (gathered rows)."""
    import receraser_core.aggregate.base as agg_base

    monkeypatch.setattr(agg_base, "DENSE_BLOCK_RATIO", 64 if dense else 0)
    g = torch.Generator().manual_seed(5)
    k, n_u, n_i, d = 3, 30, 20, 6
    rng = np.random.default_rng(5)
    train = sp.csr_matrix(rng.random((n_u, n_i)) < 0.3, dtype=np.float32)
    stack = _masked_stack(g, k, n_u, n_i, d, p_user=0.8, p_item=0.8)
    cfg = AggConfig(loss="bpr", lr=0.05, batch_size=10_000, reg=reg, sampling="user", seed=2)
    models, losses = [], []
    for blocks in (False, True):
        agg = AGGREGATORS["attention"](stack, replace(cfg, user_blocks=blocks))
        opt = torch.optim.Adam([p for p in agg.parameters() if p.requires_grad], lr=cfg.lr)
        losses.append(agg._epoch(train, opt, np.random.default_rng(9)))
        models.append(agg)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # the attention's output bias shifts every logit of a row alike: its gradient is zero but for rounding, which
    # Adam scales to a full step, so the two are compared on what the weights compute, plus the transfer maps
    users = torch.arange(n_u)
    with torch.no_grad():
        assert torch.allclose(models[0].score(users), models[1].score(users), atol=1e-5)
        assert not torch.allclose(models[0].score(users), AGGREGATORS["attention"](stack, cfg).score(users))
    assert torch.allclose(models[0].transfer_w, models[1].transfer_w, atol=1e-6)
    several = AGGREGATORS["attention"](stack, replace(cfg, user_blocks=True, batch_size=64))
    opt = torch.optim.Adam([p for p in several.parameters() if p.requires_grad], lr=cfg.lr)
    assert np.isfinite(several._epoch(train, opt, np.random.default_rng(9)))  # several blocks of users


def test_compare_runs_twice_on_its_cached_work_directory(tmp_path: Path) -> None:
    """`bench compare` links the shared interactions and embeddings (with their content hashes) into each
    method's directory; a second run over the same work directory reads them back."""
    from pipelines.compare import run_compare

    base = _config(tmp_path, model="wmf")
    first = run_compare(base, tmp_path / "work", ["receraser", "sisa"], log=lambda _: None)
    again = run_compare(base, tmp_path / "work", ["receraser", "sisa"], log=lambda _: None)
    assert [r["method"] for r in first] == ["receraser", "sisa"]
    assert [r["recall@20"] for r in again] == [r["recall@20"] for r in first]


def test_learning_rate_schedule_and_first_validated_epoch() -> None:
    """Warm-up then linear decay over the whole fit, set before every step; epochs before ``valid_from`` are
    neither validated nor selectable. The packed embedding of every row is built once and stays equal to the
    packing of an explicit index (the WMF loss embeds every item at every step)."""
    sched = AggConfig(lr=0.1, epochs=10, warmup=0.2, decay="linear")
    assert sched.lr_at(0.1) == pytest.approx(0.05) and sched.lr_at(0.2) == pytest.approx(0.1)
    assert sched.lr_at(0.6) == pytest.approx(0.05) and sched.lr_at(0.999) < 1e-3
    assert all(AggConfig(lr=0.1).lr_at(p) == 0.1 for p in (0.0, 0.5, 0.99))
    for bad in ({"warmup": 1.0}, {"decay": "cosine"}, {"valid_from": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AggConfig(**bad)  # type: ignore[arg-type]

    g = torch.Generator().manual_seed(4)
    k, n_u, n_i, d = 3, 256, 30, 6
    rng = np.random.default_rng(4)
    block = (np.arange(n_u)[:, None] % 2) == (np.arange(n_i)[None, :] % 2)
    draw = rng.random((n_u, n_i))
    train = sp.csr_matrix(block & (draw < 0.5), dtype=np.float32)
    valid = sp.csr_matrix(block & (draw >= 0.5) & (draw < 0.7), dtype=np.float32)
    stack = _masked_stack(g, k, n_u, n_i, d, p_user=0.8, p_item=0.8)
    cfg = AggConfig(
        loss="wmf", epochs=5, patience=5, lr=0.05, batch_size=16 * 64, warmup=0.2, decay="linear", valid_from=3, seed=2
    )
    seen: list[float] = []

    class Spy(AGGREGATORS["attention"]):  # type: ignore[misc, valid-type]
        def _set_lr(self, opt: torch.optim.Optimizer, epoch: int, done: int, total: int) -> None:
            super()._set_lr(opt, epoch, done, total)
            seen.append(opt.param_groups[0]["lr"])

    agg = Spy(stack, cfg)
    fit = agg.fit(train, valid)
    assert len(seen) == 5 * 4  # 256 users, 64 a step, 5 epochs
    assert seen[:4] == sorted(seen[:4]) and max(seen) == pytest.approx(0.05)
    assert seen[4:] == sorted(seen[4:], reverse=True) and seen[-1] == pytest.approx(0.05 * (1 / 20) / 0.8)
    assert [("valid_recall@10" in h) for h in fit.history] == [False, False, True, True, True]
    assert fit.best_epoch >= 3
    everyone = torch.arange(n_i)
    first = agg.item_embed(everyone)
    assert torch.equal(first, agg.item_embed(everyone))
    parts, counts, col = agg._pack(stack.items, stack.item_mask, stack.item_count, everyone)
    uncached = agg.item_att.packed(
        torch.cat([x @ agg.transfer_w[k].t() + agg.transfer_b[k] for k, x in parts]), counts, col, n_i
    )
    assert torch.equal(first, uncached)
    # at most 2 steps an epoch: 128 users a step instead of 64, the same schedule over 10 steps
    seen.clear()
    Spy(stack, replace(cfg, max_steps_per_epoch=2)).fit(train, valid)
    assert len(seen) == 5 * 2 and max(seen) == pytest.approx(0.05)
    seen.clear()
    Spy(stack, replace(cfg, max_steps_per_epoch=8)).fit(train, valid)  # a cap above 4 steps changes nothing
    assert len(seen) == 5 * 4
