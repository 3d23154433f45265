"""Export a trained moe_core model (and its tokenizer) as a Hugging Face model folder.

The export uses the class transformers ships whenever one computes exactly what the model does:
`LlamaForCausalLM` for a dense model, `MixtralForCausalLM` for a MoE that is Mixtral in every
respect (see `mixtral_blockers`). Everything else gets `MoESweepForCausalLM`, a self-contained
modeling file copied into the folder and loaded with `trust_remote_code=True`. The folder holds
`model.safetensors`, `config.json`, `generation_config.json` and the tokenizer, and loads with
`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(folder)`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, MixtralConfig, PretrainedConfig

from moe_core.config import ModelConfig
from moe_core.data.tokenizers import Tokenizer
from moe_core.errors import ConfigError
from moe_core.files import atomic_dir
from moe_core.data.tokens import trial_tokenizer
from moe_core.export.configuration_moe_sweep import MoESweepConfig
from moe_core.export.tokenizer import hf_tokenizer
from moe_core.export.weights import llama_tensors, mixtral_tensors, moe_sweep_tensors
from moe_core.model import MoETransformer
from moe_core.train.checkpoint import load_trained

LLAMA, MIXTRAL, MOE_SWEEP = "LlamaForCausalLM", "MixtralForCausalLM", "MoESweepForCausalLM"
REMOTE_CODE = ("configuration_moe_sweep.py", "modeling_moe_sweep.py")  # copied into MoESweep exports


@dataclass(frozen=True)
class ExportInfo:
    """What `export_hf` wrote, and how to load it."""

    out_dir: Path
    architecture: str  # LlamaForCausalLM, MixtralForCausalLM or MoESweepForCausalLM
    reason: str  # why that class: what the model is, or what Mixtral cannot express
    remote_code: bool  # loading needs trust_remote_code=True


def mixtral_blockers(cfg: ModelConfig) -> list[str]:
    """What in a MoE model `MixtralForCausalLM` cannot compute; empty when it computes it exactly.

    Mixtral is: every layer MoE, each with its own router and experts, one set of equal experts,
    softmax over all experts, top-k, gates renormalised over the top-k, nothing else. The
    loss-free balancing bias blocks it because moe_core adds it to the scores when choosing
    experts at inference too; a capacity blocks it because pairs over capacity are dropped (or
    sent to a default expert) at inference too.
    """
    moe, n_moe = cfg.moe, len(cfg.moe_layers)
    checks = [
        (n_moe != cfg.n_layers, "dense and MoE layers mixed"),
        (cfg.num_pools != n_moe, "an expert pool shared by several layers (UniPool)"),
        (cfg.num_routers != n_moe, "a router shared by several layers (PathMoE)"),
        (len(moe.experts) > 1, "several expert sets (heterogeneous experts)"),
        (moe.shared_experts > 0, "shared experts"),
        (moe.router.scoring != "softmax", f"{moe.router.scoring} router scoring"),
        (moe.router.scoring == "softmax" and not moe.router.renormalize, "gates not renormalised over the top-k"),
        (moe.balance.bias_rate > 0, "a loss-free balancing bias in expert selection"),
        (moe.capacity_factor is not None, "an expert capacity (pairs over it dropped or sent to a default expert)"),
    ]
    return [what for blocked, what in checks if blocked]


def hf_architecture(cfg: ModelConfig) -> tuple[str, str]:
    """(transformers class, why)."""
    if not cfg.moe.is_moe:
        return LLAMA, "dense SwiGLU FFNs in every layer"
    blockers = mixtral_blockers(cfg)
    if not blockers:
        return MIXTRAL, "softmax top-k MoE with renormalised gates in every layer, nothing shared"
    return MOE_SWEEP, "Mixtral cannot express " + "; ".join(blockers)


def export_hf(model: MoETransformer, model_cfg: ModelConfig, tokenizer: Tokenizer, out_dir: Path) -> ExportInfo:
    """Write `model` (weights in the dtype they have) and `tokenizer` as a Hugging Face folder.

    `out_dir` must be new or empty, so files of an earlier export (a stale modeling file) never
    mix with this one's. The folder is written beside it and renamed into place, so an export
    that fails half-way leaves nothing a loader could mistake for a model.
    """
    out = Path(out_dir)
    if model.cfg != model_cfg:
        raise ConfigError("model_cfg is not the config the model was built from")
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer '{tokenizer.name}' has {tokenizer.vocab_size} ids, "
                          f"more than the model's vocab_size {model_cfg.vocab_size}")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: export folder is not empty")
    architecture, reason = hf_architecture(model_cfg)
    tensors = {LLAMA: llama_tensors, MIXTRAL: mixtral_tensors, MOE_SWEEP: moe_sweep_tensors}[architecture](model)
    special = {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.eos_id}
    dtype = str(model.embed.weight.dtype).removeprefix("torch.")
    config = _hf_config(architecture, model, special, dtype)
    with atomic_dir(out) as tmp:  # `out` is absent or empty (checked above)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        # The remote-code model has no KV cache: `generate` must feed it the whole sequence.
        GenerationConfig(**special, use_cache=architecture != MOE_SWEEP).save_pretrained(tmp)
        if architecture == MOE_SWEEP:
            for name in REMOTE_CODE:
                shutil.copyfile(Path(__file__).with_name(name), tmp / name)
        hf_tokenizer(tokenizer, model_cfg.seq_len).save_pretrained(tmp)
    return ExportInfo(out_dir=out, architecture=architecture, reason=reason, remote_code=architecture == MOE_SWEEP)


def export_run(run_dir: Path, out_dir: Path) -> ExportInfo:
    """Export a trial's folder (`moe-sweep train --out RUN_DIR`, or a sweep trial's): its resolved
    `config.yaml`, the weights of its latest checkpoint, and the tokenizer it trained with."""
    trial, model = load_trained(run_dir)
    return export_hf(model, trial.model, trial_tokenizer(trial.data), out_dir)


def _hf_config(architecture: str, model: MoETransformer, special: dict[str, int], dtype: str) -> PretrainedConfig:
    cfg = model.cfg
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
        architectures=[architecture], dtype=dtype, **special,
    )
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base}}
    if architecture == LLAMA:
        return LlamaConfig(**common, **rope, intermediate_size=cfg.d_ff, head_dim=cfg.head_dim,
                           attention_bias=False, mlp_bias=False)
    moe = cfg.moe
    if architecture == MIXTRAL:
        (experts,) = moe.experts
        return MixtralConfig(**common, **rope, intermediate_size=cfg.expert_width(experts.granularity),
                             head_dim=cfg.head_dim, num_local_experts=experts.num_experts,
                             num_experts_per_tok=experts.top_k, sliding_window=None,
                             router_aux_loss_coef=moe.balance.aux_weight)
    config = MoESweepConfig(
        **common, rope_theta=cfg.rope_base, intermediate_size=cfg.d_ff,
        moe_layers=[ffn.layer for ffn in model.moe_layers],
        layer_pools=[ffn.pool for ffn in model.moe_layers],
        layer_routers=[ffn.router for ffn in model.moe_layers],
        expert_sets=[{"num_experts": s.num_experts, "top_k": s.top_k, "width": cfg.expert_width(s.granularity)}
                     for s in moe.experts],
        shared_expert_size=cfg.shared_width,
        router_scoring=moe.router.scoring, router_renormalize=moe.router.renormalize,
        router_norm_eps=moe.router.norm_eps, router_dtype=moe.router.dtype, selection_bias=moe.balance.bias_rate > 0,
        capacity_factor=moe.capacity_factor, overflow=moe.overflow,
    )
    config.auto_map = {
        "AutoConfig": "configuration_moe_sweep.MoESweepConfig",
        "AutoModelForCausalLM": "modeling_moe_sweep.MoESweepForCausalLM",
    }
    return config
