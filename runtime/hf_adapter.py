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


def save_tokenizer(tokenizer, path: Path) -> None:
    tokenizer.save_pretrained(path)


def load_local_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain HF folder (config, safetensors, tokenizer).

    A GGUF-loaded model is marked quantized and refuses save_pretrained, so its weights move into a
    fresh model built from the same config (minus the quantization entry)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    src = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    clean = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=torch.float32)
    clean.load_state_dict(src.state_dict(), strict=True)
    clean.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def model_from_config(config: dict, seed: int, dtype=None) -> nn.Module:
    """A random-init causal LM from a plain config dict (with "model_type"), deterministic in `seed`
    and without touching the global RNG."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    return _finish(model.to(dtype) if dtype is not None else model)


def is_model_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def load_pretrained(name_or_path: str, dtype=None, device=None) -> nn.Module:
    """A local folder or an already-cached hub id, offline only (solc never downloads at run time)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation="sdpa", local_files_only=True)
    return _finish(model, device)


def load_text_rows(name_or_file: str, suffix: str | None) -> list[str]:
    """The "text" column of a local json/jsonl/parquet file or of a cached `datasets` dataset (offline)."""
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    if suffix is not None:
        ds = load_dataset("parquet" if suffix == ".parquet" else "json", data_files=name_or_file, split="train")
    else:
        ds = load_dataset(name_or_file, split="train")
    if "text" not in ds.column_names:
        raise ValueError(f"corpus {name_or_file!r} has no 'text' column (columns: {ds.column_names})")
    return list(ds["text"])
