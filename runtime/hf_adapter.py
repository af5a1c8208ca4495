"""Every call into Hugging Face transformers lives here: its API moves fast, so one file moves with it.

The rest of solc sees plain nn.Modules and tensors; passes find sites in the captured graph, never by
HF class names.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

import runtime.quiet  # noqa: F401  before transformers (and through it torchao) is imported
from runtime.errors import UnsupportedModelError


# -- calling a causal LM ---------------------------------------------------------------------------
def causal_lm_forward(model: nn.Module, input_ids, position_ids):
    """(logits [B, T, V], last-layer hidden state [B, T, d]) without the model's own KV cache."""
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def check_causal_lm(model: nn.Module) -> None:
    """Raise UnsupportedModelError unless `model` is a materialised decoder-only HF causal LM."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise UnsupportedModelError(
            f"{name} is not a Hugging Face transformers model (it has no .config); solc compiles causal LMs "
            "loaded with AutoModelForCausalLM (or solc.load_model)")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{name} ({config.model_type}) is an encoder-decoder model; solc compiles decoder-only causal LMs")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    if name not in causal:
        raise UnsupportedModelError(
            f"{name} is not a causal language model (no LM head predicting the next token); load the "
            f"checkpoint with AutoModelForCausalLM, e.g. {config.model_type!r} -> "
            f"{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, 'a *ForCausalLM class')}")
    params = list(model.parameters())
    if not params:
        raise UnsupportedModelError(f"{name} has no parameters")
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise UnsupportedModelError(
            f"{name} has {len(meta)} parameters on the meta device (e.g. {meta[0]}): it holds no weights; "
            "load them first (from_pretrained, or to_empty() then load_state_dict)")
    if not params[0].is_floating_point():
        raise UnsupportedModelError(f"{name} has {params[0].dtype} weights; solc compiles floating-point models")


def max_positions(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 4096)


def extend_positions(model: nn.Module, positions: int) -> bool:
    """Let `model` take `positions` positions (speed benchmarks past the trained length: rotary embeddings
    are computed, not tabulated, so only the config's bound moves). Returns whether it was raised."""
    if max_positions(model) >= positions:
        return False
    model.config.max_position_embeddings = int(positions)
    return True


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


def eos_token_ids(model: nn.Module) -> list[int]:
    """The ids HF `generate` stops at: the generation config's eos_token_id (else the model config's)."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


# -- saving and loading (offline) ------------------------------------------------------------------
@contextlib.contextmanager
def quiet_loading():
    """transformers' progress bars and info logs off while solc loads or saves a model (SOLC_VERBOSE=1
    keeps them); the import noise of its dependencies is filtered by runtime.quiet."""
    from runtime import quiet

    if quiet.verbose():
        yield
        return
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()

def _finish(model: nn.Module, device=None) -> nn.Module:
    model.eval().requires_grad_(False)  # the base model is frozen
    return model.to(device) if device is not None else model


def save_base_model(model: nn.Module, path: Path) -> None:
    with quiet_loading():
        model.save_pretrained(path, safe_serialization=True)


def save_tokenizer(tokenizer, path: Path) -> None:
    with quiet_loading():
        tokenizer.save_pretrained(path)


def load_local_tokenizer(path: Path):
    from transformers import AutoTokenizer

    with quiet_loading():
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
    with torch.random.fork_rng(devices=[]), quiet_loading():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    return _finish(cast(model, dtype) if dtype is not None else model)


def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """model.to(dtype), but non-persistent buffers (rotary inv_freq) keep their dtype, as in a model
    from_pretrained(dtype=...) builds: HF computes them in fp32 and a bf16 inv_freq moves every angle."""
    kept = non_persistent_buffers(model)
    model.to(dtype)
    restore_buffers(model, kept)
    return model


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of the buffers save_pretrained does not write (recomputed by from_pretrained, so
    a model whose copies were cast or edited would load with other values)."""
    out = {}
    for prefix, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None:
                out[f"{prefix}.{name}" if prefix else name] = buffer
    return out


def restore_buffers(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Set each named buffer to `tensors[name]` (value and dtype; on the buffer's device). KeyError
    names a buffer the model lacks, ValueError one whose shape differs."""
    for full, value in tensors.items():
        prefix, _, name = full.rpartition(".")
        try:
            module = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            raise KeyError(full) from None
        if module._buffers.get(name) is None:
            raise KeyError(full)
        current = module._buffers[name]
        if current.shape != value.shape:
            raise ValueError(f"{full}: shape {tuple(value.shape)}, the model's {tuple(current.shape)}")
        module._buffers[name] = value.detach().clone().to(current.device)


def is_model_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def load_pretrained(name_or_path: str, dtype=None, device=None) -> nn.Module:
    """A local folder or an already-cached hub id, offline only (solc never downloads at run time)."""
    from transformers import AutoModelForCausalLM

    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation="sdpa", local_files_only=True)
    return _finish(model, device)


def cached_dataset_texts(name: str) -> tuple[list[str], list | None]:
    """(column names, the "text" column's values as stored, or None without one) of a `datasets` dataset
    already in the local cache (offline; solc never downloads at run time; solc.data checks each row).
    The loader's own exception (many types) when there is no such dataset."""
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    ds = load_dataset(name, split="train")
    return ds.column_names, (list(ds["text"]) if "text" in ds.column_names else None)


# -- decode benchmarks: the model's shape and HF's own static-cache decode (the baseline) ----------
def decoder_shape(model: nn.Module) -> dict:
    """The sizes that set a decoder-only LM's decode cost: hidden, layers, query/KV heads, head_dim,
    MLP width, vocab, and whether the LM head is tied to the embedding."""
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    return {
        "model_type": cfg.model_type,
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        "intermediate_size": int(cfg.intermediate_size),
        "vocab_size": int(cfg.vocab_size),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
    }


def static_cache(model: nn.Module, batch: int, max_len: int, dtype=None, device=None, storage=None):
    """An HF StaticCache for `batch` rows of `max_len` tokens, allocated now (not on first use).

    storage: optional per-layer (keys, values) tensors [batch, Hkv, max_len, D] the cache uses as its
    storage, without a copy (e.g. a solc cache's, so both decoders step on the same bytes)."""
    from transformers import StaticCache

    shape = decoder_shape(model)
    param = next(model.parameters())
    dtype, device = dtype or param.dtype, device or param.device
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    if storage is None:
        cache.early_initialization(batch, shape["num_key_value_heads"], shape["head_dim"], dtype, device)
        return cache
    if len(storage) != len(cache.layers):
        raise ValueError(f"storage has {len(storage)} layers, the model {len(cache.layers)}")
    for layer, (keys, values) in zip(cache.layers, storage):
        if keys.shape != (batch, shape["num_key_value_heads"], max_len, shape["head_dim"]) or values.shape != keys.shape:
            raise ValueError(f"storage tensors {tuple(keys.shape)} do not match a [{batch}, "
                             f"{shape['num_key_value_heads']}, {max_len}, {shape['head_dim']}] cache")
        layer.lazy_initialization(keys[:, :, :0], values[:, :, :0])  # sets dtype/device; allocates one layer
        layer.keys, layer.values = keys, values  # ... which is freed here
        torch._dynamo.mark_static_address(keys)
        torch._dynamo.mark_static_address(values)
    return cache


def static_cache_tensors(cache) -> list[tuple]:
    """Per layer, the (keys, values) [B, Hkv, max_len, D] tensors an HF StaticCache writes in place."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def set_static_cache_length(cache, length: int) -> None:
    """Declare the first `length` slots of every layer filled: the next token is written at `length`
    (lets a benchmark fill the cache synthetically and re-time steps from the same position)."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


def static_cache_decode_step(model: nn.Module, cache, compile: bool = False, compile_mode: str | None = None):
    """HF's decode step on a StaticCache, as `generate(cache_implementation="static")` runs it:
    step(ids [B, 1], positions [B, 1]) -> logits [B, 1, V]; the cache advances by one token.
    compile=True wraps it in torch.compile(fullgraph=True) (mode e.g. "reduce-overhead" on CUDA)."""

    def step(ids, positions):
        return model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True).logits

    if compile:
        return torch.compile(step, fullgraph=True, dynamic=False, mode=compile_mode)
    return step


def generate_greedy(model: nn.Module, input_ids, max_new_tokens: int):
    """HF `model.generate` as a user calls it (default cache), greedy, exactly `max_new_tokens` new tokens
    per row: returns [B, prompt + max_new_tokens] token ids."""
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                          min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
