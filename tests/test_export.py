"""Hugging Face export: every variant loads with transformers and computes moe_core's logits."""

from __future__ import annotations

from pathlib import Path

import json
import pytest
import torch

from tests.deps import require

require("transformers", "safetensors")

from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_core import ConfigError
from moe_core.data.tokenizers import EOS, BPETokenizer, ByteTokenizer, train_bpe
from moe_core.export import export_hf, export_run
from moe_core.train.checkpoint import CheckpointError
from moe_core.model import build_model
from moe_core.train.loop import train_trial
from moe_core.trial import TrialConfig
from tests.conftest import experts, tiny

# init_std 0.1 spreads logits (std ~0.5) and router scores, so a wrong conversion or routing rule
# shows as an error of ~0.1 or more, far above the 1e-4 tolerance.
WIDE = {"vocab_size": 257, "init_std": 0.1}
MOE = {"layout": "layerwise", "experts": [experts(4, 2)]}
CASES = {
    "dense": (tiny(**WIDE), "LlamaForCausalLM"),
    "mixtral": (tiny({**MOE, "router": {"renormalize": True}}, **WIDE), "MixtralForCausalLM"),
    "mixtral_but_bias": (tiny({**MOE, "router": {"renormalize": True}, "balance": {"bias_rate": 0.01}}, **WIDE),
                         "MoESweepForCausalLM"),
    "unipool_tied": (tiny({"layout": "unipool", "experts": [experts(8, 2, 0.5)]}, tie_embeddings=True, **WIDE),
                     "MoESweepForCausalLM"),
    "pathmoe": (tiny({**MOE, "router": {"block_size": 2}}, **WIDE), "MoESweepForCausalLM"),
    "hetero_shared_mixed": (tiny({"layout": "layerwise", "experts": [experts(4, 1, 0.5), experts(4, 1, "1/4")],
                                  "shared_experts": 1, "shared_granularity": "1/4", "moe_every": 2}, **WIDE),
                            "MoESweepForCausalLM"),
    "sigmoid": (tiny({**MOE, "router": {"scoring": "sigmoid"}}, **WIDE), "MoESweepForCausalLM"),
    "norm_router_groups": (tiny({"layout": "unipool", "pool_group_size": 2, "experts": [experts(4, 2)],
                                 "router": {"scoring": "norm"}}, **WIDE), "MoESweepForCausalLM"),
    "capacity_drop": (tiny({**MOE, "capacity_factor": 0.5}, **WIDE), "MoESweepForCausalLM"),
    "capacity_default_expert": (tiny({**MOE, "capacity_factor": 0.75, "overflow": "default_expert"}, **WIDE),
                                "MoESweepForCausalLM"),
}


def _trained_looking(cfg):
    """A random model with the state training leaves: loss-free biases and NormRouter's sigma
    away from their initial values, so an export that ignored them would differ."""
    model = build_model(cfg).eval()
    with torch.no_grad():
        for ffn in model.moe_layers:
            ffn.bias_N.normal_(0.0, 0.1)
        for router in model.routers:
            if hasattr(router, "sigma"):
                router.sigma.fill_(1.5)
    return model


def _load(info):
    model, loading = AutoModelForCausalLM.from_pretrained(
        info.out_dir, trust_remote_code=info.remote_code, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    return model.eval()


def _greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """moe_core's greedy continuation, the whole sequence recomputed at every step."""
    seq = prompt
    for _ in range(steps):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    return seq


@pytest.mark.parametrize("case", CASES)
def test_export_computes_the_same_logits_and_generates(case, tmp_path):
    cfg, expected = CASES[case]
    model = _trained_looking(cfg)
    info = export_hf(model, cfg, ByteTokenizer(), tmp_path / "hf")
    assert info.architecture == expected and info.remote_code == (expected == "MoESweepForCausalLM")
    hf = _load(info)
    assert type(hf).__name__ == expected
    x = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, atol=1e-4, rtol=0)
        prompt = x[:1, :6]
        generated = hf.generate(prompt, max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, _greedy(model, prompt, 4))


def test_a_compute_dtype_router_exports_as_one(tmp_path):
    """The export routes as training did: with router.dtype compute the logits' matmul runs in
    the input's dtype, bit for bit moe_core's router on bfloat16 input."""
    cfg = tiny({**MOE, "router": {"dtype": "compute"}}, **WIDE)
    model = _trained_looking(cfg)
    hf = _load(export_hf(model, cfg, ByteTokenizer(), tmp_path / "hf"))
    assert hf.config.router_dtype == "compute"
    x = torch.randn(5, cfg.d_model).bfloat16()
    with torch.no_grad():
        assert torch.equal(hf.model.routers[0](x), model.routers[0](x)[1])
        float32 = tiny(MOE, **WIDE)  # the default: a float32 matmul, in the export too
        hf32 = _load(export_hf(_trained_looking(float32), float32, ByteTokenizer(), tmp_path / "hf32"))
        router32 = hf32.model.routers[0]
        assert hf32.config.router_dtype == "float32"
        assert torch.equal(router32(x), (x.float() @ router32.weight.float().t()).softmax(dim=-1))


def test_mixtral_blockers_are_named(tmp_path):
    cfg, _ = CASES["mixtral_but_bias"]
    info = export_hf(build_model(cfg), cfg, ByteTokenizer(), tmp_path)
    assert info.reason == "Mixtral cannot express a loss-free balancing bias in expert selection"


def test_left_padding_leaves_the_real_tokens_logits_unchanged(tmp_path):
    cfg, _ = CASES["pathmoe"]
    model = _trained_looking(cfg)
    hf = _load(export_hf(model, cfg, ByteTokenizer(), tmp_path))
    x = torch.randint(0, cfg.vocab_size, (1, 10))
    padded = torch.cat([torch.full((1, 6), 256), x], dim=1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(hf(padded, attention_mask=mask).logits[:, 6:], model(x).logits, atol=1e-4, rtol=0)


def _dense_for(tokenizer, tmp_path: Path):
    cfg = tiny(vocab_size=tokenizer.vocab_size)
    export_hf(build_model(cfg), cfg, tokenizer, tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path)


TEXTS = ["In the beginning God created the heaven and the earth.", "  spaces,\ttabs\nand ünïcödé — 日本語 ✓"]


def test_bpe_tokenizer_round_trips(tmp_path):
    train_bpe(TEXTS * 20, 300, tmp_path / "bpe.json")
    ours = BPETokenizer(tmp_path / "bpe.json")
    hf = _dense_for(ours, tmp_path / "hf")
    assert hf.eos_token == hf.bos_token == EOS and hf.eos_token_id == ours.eos_id
    for text in TEXTS:
        ids = hf.encode(text)
        assert ids == ours.encode_batch([text])[0]
        assert hf.decode(ids) == text


def test_byte_tokenizer_round_trips(tmp_path):
    ours = ByteTokenizer()
    hf = _dense_for(ours, tmp_path)
    assert hf.eos_token_id == ours.eos_id == 256 and len(hf) == 257
    for text in TEXTS:
        ids = hf.encode(text)
        assert ids == ours.encode_batch([text])[0]
        assert hf.decode(ids) == text
    assert hf.decode([104, 105, 256], skip_special_tokens=True) == "hi"


def test_export_run_exports_a_trained_trial(cache, tmp_path):
    trial = TrialConfig.from_dict({
        "model": {"vocab_size": 257, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "seq_len": 32,
                  "moe": {"layout": "layerwise", "experts": [experts(4, 2, 0.5)], "balance": {"bias_rate": 0.01}}},
        "train": {"steps": 2, "batch_tokens": 128, "micro_batch_size": 4, "eval_every": 2, "eval_tokens": 128},
        "data": {"tokenizer": "bytes", "cache_dir": str(cache)},
    })
    train_trial(trial, tmp_path / "run")
    info = export_run(tmp_path / "run", tmp_path / "hf")
    hf = _load(info)
    state = torch.load(tmp_path / "run" / "checkpoints" / "step00000002.pt", weights_only=False)["model"]
    model = build_model(trial.model).eval()
    model.load_state_dict(state)
    assert state["blocks.0.ffn.bias_N"].abs().sum() > 0  # two steps moved the biases the export must carry
    x = torch.randint(0, 257, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(info.out_dir).decode([72, 105]) == "Hi"


def test_user_errors_are_one_line_config_errors(tmp_path):
    cfg = tiny(vocab_size=100)
    with pytest.raises(ConfigError, match="has 257 ids, more than the model's vocab_size 100"):
        export_hf(build_model(cfg), cfg, ByteTokenizer(), tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old.txt").write_text("x")
    cfg = tiny(vocab_size=257)
    with pytest.raises(ConfigError, match="export folder is not empty"):
        export_hf(build_model(cfg), cfg, ByteTokenizer(), tmp_path / "b")
    with pytest.raises(CheckpointError, match="not a trial folder"):
        export_run(tmp_path / "missing", tmp_path / "c")


def test_eval_and_export_commands_on_a_trained_trial(cache, tmp_path, capsys):
    """`moe-sweep eval` scores the checkpoint as the trainer did at its end; `moe-sweep export`
    writes a folder transformers loads; a folder that is not a trial is a one-line error."""
    from orchestrator.cli import main

    trial = TrialConfig.from_dict({
        "model": {"vocab_size": 257, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "seq_len": 64,
                  "moe": {"layout": "layerwise", "experts": [experts(4, 2, 0.5)], "router": {"renormalize": True}}},
        "train": {"steps": 2, "batch_tokens": 256, "micro_batch_size": 4, "eval_every": 2, "eval_tokens": 128,
                  "downstream": ["bible_next_verse"], "downstream_examples": 16},
        "data": {"tokenizer": "bytes", "cache_dir": str(cache)},
    })
    summary = train_trial(trial, tmp_path / "run")
    assert main(["eval", str(tmp_path / "run"), "--examples", "16", "--json", str(tmp_path / "acc.json")]) == 0
    scored = json.loads((tmp_path / "acc.json").read_text())["bible_next_verse"]
    assert scored["n"] == 16 and scored["acc"] == summary.downstream["acc_bible_next_verse"]
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "wrote MixtralForCausalLM" in out, out
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a trial folder (no config.yaml" in err
