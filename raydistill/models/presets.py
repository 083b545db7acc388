"""Built-in tiny architectures, built from a config with random weights (offline tests and debugging)."""

from __future__ import annotations

from typing import Any

from transformers import BertConfig, GPT2Config, LlamaConfig, PretrainedConfig

# Small enough to train on 2 CPU cores in seconds, with the real block structure of each family.
_PRESETS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "tiny-bert": (BertConfig, dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   intermediate_size=256, max_position_embeddings=512, type_vocab_size=2)),
    "tiny-gpt2": (GPT2Config, dict(n_embd=64, n_layer=4, n_head=4, n_positions=512)),
    "tiny-llama": (LlamaConfig, dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=176, max_position_embeddings=512,
                                     tie_word_embeddings=True)),
}

ENCODER_PRESETS = ("tiny-bert",)


def preset_config(name: str, vocab_size: int, special_ids: dict[str, int | None],
                  overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    cls, kwargs = _PRESETS[name]
    kwargs = {**kwargs, "vocab_size": vocab_size, **{k: v for k, v in special_ids.items() if v is not None}}
    config = cls(**kwargs)
    config.architectures = ["BertForMaskedLM" if name in ENCODER_PRESETS else
                            "GPT2LMHeadModel" if name == "tiny-gpt2" else "LlamaForCausalLM"]
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    return config
