import pytest
import yaml

from moe_core import ConfigError, ExpertSetConfig, ModelConfig, MoEConfig, study_moe
from tests.conftest import TINY, experts, tiny


def test_config_round_trips_through_yaml():
    cfg = tiny(
        {
            "layout": "unipool",
            "experts": [experts(8, 2, "1/2"), experts(4, 1, 1.0)],
            "pool_group_size": 2,
            "router": {"scoring": "norm", "block_size": 2},
            "balance": {"aux_weight": 0.0, "pool_weight": 0.02},
        }
    )
    again = ModelConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
    assert again.moe.experts[0].granularity == 0.5


def test_study_parametrisation_gives_k_and_n_from_sparsity_and_granularity():
    moe = study_moe(8, "1/4")
    assert (moe.experts[0].top_k, moe.experts[0].num_experts) == (4, 32)
    assert moe.active_fraction == 1.0


def test_shared_experts_shrink_routed_top_k_to_stay_flop_matched():
    moe = study_moe(8, "1/8", shared_experts=2)
    assert moe.experts[0].top_k == 6  # (1 - 2/8) / (1/8)
    assert moe.experts[0].num_experts == 48  # S * k
    assert moe.active_fraction == pytest.approx(1.0)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: study_moe(8, 0.3), "top_k = 1 / granularity 0.3 = 3.33333 is not a whole number"),
        (lambda: study_moe(1.5, "1/3"), "num_experts = sparsity 1.5 * top_k 3 = 4.5 is not a whole number"),
        (lambda: tiny({"layout": "layerwise", "experts": [experts(4, 5)]}), "top_k (5) must be <= num_experts (4)"),
        (lambda: ModelConfig.from_dict({**TINY, "moe": {"layout": "layerwise", "experts": [experts(4, 1)], "router": {"scoring": "topk"}}}),
         "ModelConfig: moe.router.scoring: Input should be 'softmax', 'sigmoid' or 'norm'"),
        (lambda: tiny({"layout": "layerwise", "experts": [experts(4, 1, "1/5")]}), "is not a whole number"),
        (lambda: tiny({"layout": "layerwise", "experts": [experts(4, 1, 2.0)]}), "less than or equal to 1"),
        (lambda: tiny({"layout": "layerwise"}), "needs at least one entry in experts"),
        (lambda: tiny({"layout": "layerwise", "experts": [experts(4, 1)], "pool_group_size": 2}),
         "pool_group_size is only allowed with layout 'unipool'"),
        (lambda: tiny({"layout": "unipool", "experts": [experts(4, 1)], "router": {"scoring": "norm", "renormalize": True}}),
         "renormalize must be false"),
        (lambda: tiny(n_heads=5), "d_model (32) must be divisible by n_heads (5)"),
        (lambda: ModelConfig.from_dict({**TINY, "n_layer": 3}), "n_layer: unknown key"),
        (lambda: MoEConfig(layout="layerwise", experts=[experts(4, 1, "one/eighth")]), "not a number or a fraction"),
    ],
)
def test_bad_values_raise_one_clear_line(build, message):
    with pytest.raises(ConfigError) as err:
        build()
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_moe_layer_selection():
    assert tiny({"layout": "layerwise", "experts": [experts(4, 1)]}).moe_layers == (0, 1, 2, 3)
    assert tiny({"layout": "layerwise", "experts": [experts(4, 1)], "first_dense_layers": 1}).moe_layers == (1, 2, 3)
    assert tiny({"layout": "layerwise", "experts": [experts(4, 1)], "moe_every": 2}).moe_layers == (0, 2)
    assert tiny().moe_layers == ()


def test_expert_set_from_sparsity_rejects_non_integral():
    with pytest.raises(ConfigError, match="is not a whole number"):
        ExpertSetConfig.from_sparsity(4, 0.75)
