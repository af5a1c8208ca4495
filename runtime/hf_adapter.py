"""Every call into Hugging Face transformers lives here: its API moves fast, so one file moves with it.

The rest of solc sees plain nn.Modules and tensors; passes find sites in the captured graph, never by
HF class names.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


# -- calling a causal LM ---------------------------------------------------------------------------
def causal_lm_forward(model: nn.Module, input_ids, position_ids):
    """(logits [B, T, V], last-layer hidden state [B, T, d]) without the model's own KV cache."""
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def max_positions(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 4096)


def sliding_window(model: nn.Module) -> int | None:
    """The attention window if the model limits it (Mistral-style), else None."""
    cfg = model.config
    if getattr(cfg, "use_sliding_window", True) is False:
        return None
    window = getattr(cfg, "sliding_window", None)
    return int(window) if window else None


def vocab_size(model: nn.Module) -> int:
    return int(model.config.vocab_size)


def config_dict(model: nn.Module) -> dict:
    return model.config.to_dict()


# -- saving and loading (offline) ------------------------------------------------------------------
def _finish(model: nn.Module, device=None) -> nn.Module:
    model.eval().requires_grad_(False)  # the base model is frozen
    return model.to(device) if device is not None else model


def save_base_model(model: nn.Module, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)


def load_base_model(path: Path, dtype=None, device=None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa", local_files_only=True
    )
    return _finish(model, device)


def save_tokenizer(tokenizer, path: Path) -> None:
    tokenizer.save_pretrained(path)


def load_local_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)
