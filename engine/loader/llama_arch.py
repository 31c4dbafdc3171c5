"""The LLaMA family as the loaders see it: config from config.json or GGUF metadata, GGUF tensor names."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from tokenwire.engine.loader.architecture import Architecture
from tokenwire.engine.models.llama import LlamaConfig, LlamaForCausalLM

_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def config_from_hf(config: Mapping[str, Any]) -> LlamaConfig:
    """A LlamaConfig from a Hugging Face config.json dict.

    Raises:
        ValueError: a key is missing, or the checkpoint uses a feature this model lacks.
    """
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{flag}=true is not supported")
    # NOTE: transformers >= 5 writes rope settings as "rope_parameters"; older versions write
    # "rope_theta" and "rope_scaling" at the top level.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported")
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return LlamaConfig(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=_eos_ids(config.get("eos_token_id")),
        )
    except KeyError as exc:
        raise ValueError(f"config.json lacks {exc.args[0]!r}") from exc


def config_from_gguf(meta: Mapping[str, Any], arch: str, shapes: Mapping[str, tuple[int, ...]]) -> LlamaConfig:
    """A LlamaConfig from GGUF metadata (keys ``{arch}.block_count`` and so on) and tensor shapes.

    Raises:
        ValueError: a key or tensor is missing, or the file uses a feature this model lacks.
    """

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise ValueError(f"metadata lacks {arch}.{key}")
        return meta[f"{arch}.{key}"]

    if "token_embd.weight" not in shapes:
        raise ValueError("no token_embd.weight tensor")
    if "rope_freqs.weight" in shapes:
        raise ValueError("RoPE frequency factors (llama3-style RoPE scaling) are not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise ValueError(f"RoPE scaling {scaling!r} is not supported")
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        # NOTE: the embedding's rows, not {arch}.vocab_size, which older converters omit.
        vocab_size=shapes["token_embd.weight"][0],
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings="output.weight" not in shapes,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_ids(eos),
    )


def unpermute_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: [heads*D, in] from adjacent-pair to half-split RoPE order.

    llama.cpp's converter reorders each head's rows from (half, D/2) to (D/2, half) so that its
    RoPE can rotate adjacent pairs; our RoPE (Hugging Face's) rotates the two halves.
    """
    rows = weight.shape[0]
    # weight: [H, D/2, 2, in] -> [H, 2, D/2, in] -> [H*D, in]
    w = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)


def gguf_weight(name: str, tensor: torch.Tensor, config: LlamaConfig) -> tuple[str, torch.Tensor]:
    """Map one GGUF tensor to its Hugging Face name, undoing the q/k permutation.

    Raises:
        ValueError: a tensor name this architecture does not have.
    """
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name], tensor
    match = _GGUF_LAYER_RE.fullmatch(name)
    if match is None or match.group(2) not in _GGUF_LAYER:
        raise ValueError(f"unexpected tensor {name!r} for a LLaMA model")
    layer, kind = match.group(1), match.group(2)
    if kind == "attn_q":
        tensor = unpermute_rope(tensor, config.num_heads)
    elif kind == "attn_k":
        tensor = unpermute_rope(tensor, config.num_kv_heads)
    return f"model.layers.{layer}.{_GGUF_LAYER[kind]}.weight", tensor


def build(config: LlamaConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """An uninitialized LlamaForCausalLM on ``device`` in ``dtype``, in inference mode (eval, no grads)."""
    return LlamaForCausalLM(config, dtype=dtype, device=device).eval().requires_grad_(False)


LLAMA = Architecture(
    name="llama",
    gguf_names=("llama",),
    hf_names=("LlamaForCausalLM", "llama"),
    config_from_hf=config_from_hf,
    config_from_gguf=config_from_gguf,
    gguf_weight=gguf_weight,
    build=build,
)
