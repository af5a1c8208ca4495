"""solc.load_model: the built-in SmolLM2-135M, tiny random-init models for tests, or any local HF folder.

    load_model()                    # SmolLM2-135M-Instruct, from the asset cache (python -m solc.assets fetch)
    load_model("tiny-qwen3")        # a 2-layer random Qwen3, deterministic in `seed`
    load_model("/path/to/hf-folder", dtype="bfloat16")
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from runtime import hf_adapter
from runtime import validation
from runtime.errors import ArgumentError, ArgumentTypeError, AssetError
from solc import assets

BUILTIN = "smollm2-135m"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Tiny shapes: hidden 64, 2 layers, 4 query heads of 16, GQA with 2 KV heads unless said otherwise.
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=128, vocab_size=256, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
             pad_token_id=0, tie_word_embeddings=False)
TINY_MODELS: dict[str, dict] = {
    "tiny-llama": dict(_TINY, model_type="llama"),
    "tiny-llama-mha": dict(_TINY, model_type="llama", num_key_value_heads=4),
    "tiny-mistral": dict(_TINY, model_type="mistral", sliding_window=None),
    "tiny-qwen2": dict(_TINY, model_type="qwen2"),
    "tiny-qwen3": dict(_TINY, model_type="qwen3"),
    "tiny-phi3": dict(_TINY, model_type="phi3"),
    "tiny-gemma": dict(_TINY, model_type="gemma"),
    # non-gated MLP (dense_h_to_4h -> gelu -> dense_4h_to_h), MHA, partial rotary
    "tiny-gpt-neox": dict(model_type="gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, vocab_size=256, max_position_embeddings=1024,
                          bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
}


def resolve_dtype(dtype, argument: str = "dtype") -> torch.dtype | None:
    """None, a floating torch.dtype, or its name ("float32", "torch.bfloat16", ...)."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ArgumentError(argument, f"{argument}={dtype!r} is not supported; valid choices: {sorted(DTYPES)} or one of those torch.dtypes")


def resolve_device(device, argument: str = "device") -> torch.device | None:
    """None, a torch.device, or its name; "auto" is cuda when available, else cpu."""
    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ArgumentError(argument, f"{argument}={device!r} is not a valid device (e.g. 'auto', 'cpu', 'cuda', 'cuda:1')") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(argument, f"{argument}={str(device)!r}: CUDA is not available on this machine; use 'cpu' or 'auto'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ArgumentError(argument, f"{argument}={str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


_dtype, _device = resolve_dtype, resolve_device


def _unknown(name: str) -> AssetError:
    return AssetError(
        f"unknown model {name!r}: not a built-in name ({BUILTIN!r}, {', '.join(map(repr, TINY_MODELS))}) "
        "and not a local folder containing config.json"
    )


def load_model(name_or_path: str = BUILTIN, dtype=None, device=None, seed: int = 0) -> nn.Module:
    """A frozen (eval, no grad) causal LM using SDPA attention. See the module docstring.

    A string equal to a built-in name ("smollm2-135m", "tiny-llama", ...) is the built-in model even
    where a folder of that name exists in the current directory (a warning says so); pass such a folder
    as "./tiny-llama" or a pathlib.Path, which always mean a local folder. A folder that cannot be
    loaded (no weights, corrupt weights or config.json) is an AssetError naming it."""
    dtype, device = _dtype(dtype), _device(device)
    if not isinstance(name_or_path, (str, Path)):
        raise ArgumentTypeError("name_or_path", f"name_or_path must be a model name or a path, got {type(name_or_path).__name__}")
    seed = validation.check_seed(seed)
    name = str(name_or_path)
    if isinstance(name_or_path, str) and (name in TINY_MODELS or name == BUILTIN):
        _warn_if_shadowed(name)
        if name in TINY_MODELS:
            model = hf_adapter.model_from_config(TINY_MODELS[name], seed=seed, dtype=dtype)
            return model.to(device) if device is not None else model
        path = assets.model_dir(BUILTIN)
        assets.verify_marker(path)  # sizes only: ~1 ms; `fetch --force` rebuilds a corrupt entry
        return _load_folder(path, dtype, device, "rebuild it with `python -m solc.fetch --force`")
    path = Path(name).expanduser()
    if hf_adapter.is_model_dir(path):
        return _load_folder(path, dtype, device, "it needs config.json and the weights save_pretrained writes "
                                                 "(model.safetensors or its shards): re-save or re-download it")
    raise _unknown(name)


def _warn_if_shadowed(name: str) -> None:
    if hf_adapter.is_model_dir(Path(name)):
        warnings.warn(f"{name!r} is a built-in model name and also a folder here; loading the built-in model "
                      f"(pass './{name}' or a pathlib.Path for the folder)", stacklevel=3)


# What transformers / safetensors raise for a folder they cannot read (no weights, a corrupt or
# truncated file, invalid JSON, an unknown model_type).
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


def _load_folder(path: Path, dtype, device, fix: str) -> nn.Module:
    try:
        return hf_adapter.load_pretrained(str(path), dtype=dtype, device=device)
    except _LOAD_ERRORS as e:
        raise AssetError(f"{path}: cannot load a model from this folder ({_first_line(e)}); {fix}") from e


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def load_compiled(name_or_path: str = BUILTIN, dtype=None, device=None, actions=("attn", "mlp", "quant"),
                  levels: dict | None = None, max_seq_len: int | None = None, quant: str = "weight"):
    """load_model then solc.compile: the base model, frozen, compiled for the given action space."""
    from solc.compile import compile as compile_model

    model = load_model(name_or_path, dtype=dtype, device=device)
    return compile_model(model, actions=actions, levels=levels, max_seq_len=max_seq_len, quant=quant)


def load_tokenizer(name_or_path: str = BUILTIN):
    """The tokenizer of the built-in model or of a local folder (an AssetError naming the folder if it
    holds none). Names resolve as in load_model."""
    if not isinstance(name_or_path, (str, Path)):
        raise ArgumentTypeError("name_or_path", f"name_or_path must be a model name or a path, got {type(name_or_path).__name__}")
    name = str(name_or_path)
    if isinstance(name_or_path, str) and name in TINY_MODELS:
        raise AssetError(f"{name!r} is a random-init test model and has no tokenizer; use token ids directly")
    if isinstance(name_or_path, str) and name == BUILTIN:
        path = assets.model_dir(BUILTIN)
        assets.verify_marker(path)
        fix = "rebuild it with `python -m solc.fetch --force`"
    else:
        path = Path(name).expanduser()
        if not hf_adapter.is_model_dir(path):
            raise _unknown(name)
        fix = ("it needs the files a tokenizer's save_pretrained writes (tokenizer.json, tokenizer_config.json); "
               "save the tokenizer there or pass the folder that has it")
    try:
        return hf_adapter.load_local_tokenizer(path)
    except _LOAD_ERRORS as e:
        raise AssetError(f"{path}: cannot load a tokenizer from this folder ({_first_line(e)}); {fix}") from e
