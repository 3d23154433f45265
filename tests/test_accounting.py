import random

import pytest

from moe_core import ModelConfig, MoEConfig, build_model, count_params
from tests.conftest import experts, tiny


def _random_config(rng: random.Random) -> ModelConfig:
    n_heads = rng.choice([2, 4])
    d_model = n_heads * rng.choice([4, 8])
    d_ff = rng.choice([16, 32, 48])
    n_layers = rng.randint(1, 5)
    layout = rng.choice(["dense", "layerwise", "unipool"])
    moe: dict = {"layout": layout}
    if layout != "dense":
        sets = []
        for _ in range(rng.choice([1, 1, 2])):
            g = rng.choice([1.0, 0.5, 0.25])
            n = rng.randint(1, 9)
            sets.append(experts(n, rng.randint(1, n), g))
        moe["experts"] = sets
        moe["shared_experts"] = rng.choice([0, 0, 1, 2])
        moe["shared_granularity"] = rng.choice([0.25, 0.5])
        moe["router"] = {"scoring": rng.choice(["softmax", "sigmoid", "norm"]), "block_size": rng.randint(1, 3)}
        moe["first_dense_layers"] = rng.randint(0, n_layers - 1)
        moe["moe_every"] = rng.randint(1, 2)
        if layout == "unipool":
            moe["pool_group_size"] = rng.choice([None, 1, 2])
    return ModelConfig(
        vocab_size=rng.randint(5, 40),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=rng.choice([1, n_heads]),
        d_ff=d_ff,
        seq_len=8,
        tie_embeddings=rng.random() < 0.5,
        moe=MoEConfig(**moe),
    )


@pytest.mark.parametrize("seed", range(60))
def test_total_params_equal_the_built_models_numel(seed):
    cfg = _random_config(random.Random(seed))
    model = build_model(cfg)
    counted = count_params(cfg)
    # parameters() yields a shared UniPool pool or PathMoE router once.
    assert counted.total == sum(p.numel() for p in model.parameters())
    expert_numel = sum(p.numel() for pool in model.pools for p in pool.parameters())
    assert counted.expert == expert_numel


def test_flop_matched_moe_has_dense_active_params_plus_router():
    dense = count_params(tiny())
    moe = tiny({"layout": "layerwise", "experts": [experts(16, 4, "1/4")], "shared_experts": 0})
    counted = count_params(moe)
    router = moe.n_layers * 16 * moe.d_model
    assert counted.active_non_embedding == dense.active_non_embedding + router
    assert counted.flops_per_token == dense.flops_per_token + 6 * router
    assert counted.total > dense.total


# UniPool's model family (arXiv 2605.06665): GPT-2 vocabulary, GQA with 4 KV heads, untied,
# FFN 4x hidden, M = 8 L full-width top-1 experts; the vocabulary padded to a multiple of 1,024
# as the paper does (50,257 -> 51,200). Published total parameters.
UNIPOOL = [(12, 768, 12, 96, 777.9e6), (24, 1024, 16, 192, 2.588e9), (36, 1024, 16, 288, 3.834e9),
           (48, 1024, 16, 384, 5.081e9), (24, 1536, 16, 192, 5.742e9)]


@pytest.mark.parametrize("layers, hidden, heads, pool, published", UNIPOOL)
def test_unipool_family_totals_match_the_paper(layers, hidden, heads, pool, published):
    cfg = ModelConfig(
        vocab_size=51200, d_model=hidden, n_layers=layers, n_heads=heads, n_kv_heads=4, d_ff=4 * hidden,
        tie_embeddings=False, rope_base=1e6, init_std=0.01,
        moe=MoEConfig(layout="unipool", experts=[experts(pool, 1)], router={"scoring": "norm"}),
    )
    vanilla = cfg.replace(moe=cfg.moe.replace(layout="layerwise", experts=[experts(8, 1)]))
    total = count_params(cfg).total
    assert abs(total - published) / published < 0.0005  # the paper rounds to 4 digits
    # Same expert budget and active experts as vanilla 8 experts / top-1; only the routers,
    # which score M pool experts instead of 8, differ.
    assert count_params(vanilla).expert == count_params(cfg).expert
    router_gap = layers * (pool - 8) * hidden
    assert count_params(cfg).active - count_params(vanilla).active == router_gap


def test_training_budget_rule():
    """The one budget rule (trainer, planner and result columns all call it): steps are
    ceil(tokens_per_active_param x budget count / batch_tokens); the count leaves out routers, so a
    dense model and its FLOP-matched MoEs of any expert count get the same steps."""
    from moe_core.accounting import training_steps
    from moe_core.train.config import TrainConfig

    dense = tiny()
    moes = [tiny({"layout": "layerwise", "experts": [experts(n, 4, "1/4")]}) for n in (4, 16, 64)]
    train = TrainConfig(tokens_per_active_param=20, batch_tokens=64)
    c = count_params(dense)
    expected = -(-20 * c.active // 64)  # dense: no router, so matched == active
    assert training_steps(dense, train) == expected
    assert [training_steps(m, train) for m in moes] == [expected] * 3
    assert all(count_params(m).active > c.active for m in moes)  # the routers that the rule leaves out
    non_embedding = train.replace(budget_params="active_non_embedding")
    assert training_steps(moes[2], non_embedding) == -(-20 * c.active_non_embedding // 64)
    assert training_steps(moes[2], TrainConfig(batch_tokens=64)) == expected  # 20 is the default ratio
    assert training_steps(moes[2], TrainConfig(tokens=640, batch_tokens=64)) == 10
    assert training_steps(moes[2], TrainConfig(steps=7, batch_tokens=64)) == 7
