"""The Hugging Face ↔ torchtitan Llama mapping: ``config.json`` from torchtitan's llama3 model args.

Used both ways: the export writes ``hf_config_dict(args, ...)`` as ``config.json``
(``torchtitan_runai.hf.export``), and the initial load compares a Hugging Face folder's
``config.json`` with the configured flavor through the same mapping
(``hf_compatibility_problems``, ``torchtitan_runai.hf.initial_load``). Pure: no torch, no files.
Weight names and the q/k permutation are not here: torchtitan's ``Llama3StateDictAdapter`` does them.
"""

from __future__ import annotations

from typing import Any


def hf_config_dict(
    args: Any,
    *,
    intermediate_size: int,
    dtype: str,
    max_position_embeddings: int,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
) -> dict[str, Any]:
    """config.json for LlamaForCausalLM matching torchtitan's llama3 Transformer ``args``.

    torchtitan always applies the Llama-3.1 rope scaling (``RoPEScalingArgs``), so rope_type is
    ``llama3`` with the same factors; rms_norm_eps is torchtitan's ``norm_eps`` (nn.RMSNorm).
    """
    n_kv_heads = args.n_kv_heads if args.n_kv_heads is not None else args.n_heads
    scaling = args.rope_scaling_args
    rope_scaling = {
        "rope_type": "llama3",
        "factor": float(scaling.scaling_factor),
        "low_freq_factor": float(scaling.low_freq_factor),
        "high_freq_factor": float(scaling.high_freq_factor),
        "original_max_position_embeddings": int(scaling.original_max_position_embeddings),
    }
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": args.dim // args.n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(args.norm_eps),
        "vocab_size": args.vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rope_theta": float(args.rope_theta),
        "rope_scaling": rope_scaling,
        "rope_parameters": {**rope_scaling, "rope_theta": float(args.rope_theta)},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if bos_token_id is not None:
        config["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        config["eos_token_id"] = eos_token_id
    return config


def hf_compatibility_problems(hf_config: dict[str, Any], args: Any) -> list[str]:
    """Differences between a HF Llama config.json and torchtitan llama3 model args (pure)."""
    problems = []
    if hf_config.get("model_type", "llama") != "llama":
        problems.append(f"model_type is {hf_config.get('model_type')!r}, not 'llama'")
    if hf_config.get("tie_word_embeddings"):
        problems.append(
            "tie_word_embeddings is true (torchtitan llama3 has a separate output layer; Llama 3.2 1B/3B are tied)"
        )
    ours = hf_config_dict(args, intermediate_size=-1, dtype="float32", max_position_embeddings=0)
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rope_theta",
        "rms_norm_eps",
    ):
        theirs = hf_config.get(key)
        if key == "rope_theta" and theirs is None:
            theirs = (hf_config.get("rope_parameters") or {}).get("rope_theta")
        if key == "num_key_value_heads" and theirs is None:
            theirs = hf_config.get("num_attention_heads")
        if theirs is not None and float(theirs) != float(ours[key]):
            problems.append(f"{key} is {theirs}, the flavor has {ours[key]}")
    scaling = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key in scaling and float(scaling[key]) != float(ours["rope_scaling"][key]):
                problems.append(f"rope_scaling.{key} is {scaling[key]}, torchtitan uses {ours['rope_scaling'][key]}")
    elif scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        problems.append(f"rope_scaling type {scaling.get('rope_type')!r} is not llama3")
    return problems
