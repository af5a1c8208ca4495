"""solc.compile: capture a frozen HF causal LM, rewrite it into an action-conditioned SOLModel."""
from __future__ import annotations

import torch
from torch import nn

from passes.action_levels import ActionLevelsPass
from passes.attention_to_solc import AttentionToSolcPass
from passes.base import PassContext, run_passes
from passes.capture import capture
from passes.linear_to_solc import LinearToSolcPass
from passes.mlp_to_solc import MLPToSolcPass, copies_bytes
from runtime import hf_adapter
from runtime.actions import ActionSpace, check_axes
from runtime import validation
from runtime.errors import ArgumentError, ArgumentTypeError, SolcError, UnsupportedModelError
from runtime.kv_cache import CacheSpec
from runtime.sol_model import SOLModel

PIPELINE = (ActionLevelsPass, AttentionToSolcPass, MLPToSolcPass, LinearToSolcPass)
# The compile-time self-check: the dense rewritten graph must reproduce the base model.
VERIFY_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.1}


def compile(
    model: nn.Module,
    actions=("attn", "mlp", "quant"),
    levels: dict | None = None,
    max_seq_len: int | None = None,
    verify: bool = True,
    quant: str = "weight",
) -> SOLModel:
    """Return a SOLModel running `model` under per-token actions over the given axes.

    actions: enabled axes (subset of "attn", "mlp", "quant"); levels: optional per-axis level lists
    (defaults: attn 0.1/0.6/1, mlp 0.4/0.8/1, bits 4/8/16); max_seq_len: longest position the cache will
    hold (an int in 16..max_position_embeddings; default: max_position_embeddings capped at 4096); quant:
    "weight" (int8/int4 MLP weight copies made now; sol.info["mlp_copies_bytes"] says what they cost) or
    "activation" (the paper's fake-quantized MLP output, grid 5/7/16).
    """
    space, max_seq_len = _checked_arguments(model, actions, levels, max_seq_len, verify, quant)
    model.eval()
    try:
        gm = capture(model, max_seq_len)
        ctx = PassContext(space)
        pipeline_uuid = run_passes(gm, [p() for p in PIPELINE], ctx)
    except SolcError:
        raise
    except Exception as e:  # torch.export or a pass met a graph it does not handle
        raise UnsupportedModelError(
            f"solc could not capture and rewrite {type(model).__name__}: {type(e).__name__}: {str(e).strip()[:400]}"
        ) from e
    dtype = next(model.parameters()).dtype
    info = {
        "dtype": dtype,
        "max_seq_len": max_seq_len,
        "pipeline_uuid": pipeline_uuid,
        "attention_sites": ctx.attention_sites,
        "mlp_sites": ctx.mlp_sites,
        "embedding_weight": ctx.embedding_weight,
        "quant": space.quant,
        "mlp_copies_bytes": copies_bytes(gm),
    }
    specs = [CacheSpec(s.n_kv_heads, s.head_dim) for s in ctx.attention_sites]
    sol = SOLModel(gm, space, specs, info)
    object.__setattr__(sol, "base_model", model)
    if verify:
        _verify_dense(model, sol, dtype)
    return sol


def _checked_arguments(model, actions, levels, max_seq_len, verify, quant) -> tuple[ActionSpace, int]:
    """(action space, max_seq_len) after checking every argument of compile (named in the error)."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(
            "model", f"compile(model=...) expects a torch.nn.Module (a HF causal LM), got {type(model).__name__}")
    hf_adapter.check_causal_lm(model)
    given = actions
    if isinstance(actions, str):
        actions = [actions]
    if not isinstance(actions, (list, tuple)):
        raise ArgumentTypeError("actions", f"actions={actions!r} is invalid: a list of axis names, e.g. ['attn', 'mlp', 'quant']")
    try:  # checked here, not in ActionSpace, so the message names `actions` and shows what was passed
        check_axes(list(actions), "actions", shown=given)
    except ValueError as e:
        raise ArgumentError("actions", str(e)) from None
    if not isinstance(verify, bool):
        raise ArgumentTypeError("verify", f"verify={verify!r} is invalid: True or False")
    try:
        space = ActionSpace(list(actions), levels, quant=quant)
    except ValueError as e:
        argument = "quant" if "quant mode" in str(e) else "levels" if "level" in str(e) else "actions"
        raise ArgumentError(argument, str(e)) from None
    max_seq_len = validation.check_max_seq_len(max_seq_len, hf_adapter.max_positions(model), hf_adapter.sliding_window(model))
    return space, max_seq_len


@torch.no_grad()
def _verify_dense(model: nn.Module, sol: SOLModel, dtype: torch.dtype) -> None:
    """Dense actions through the rewritten graph must give the base model's logits."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    vocab = hf_adapter.vocab_size(model)
    ids = torch.randint(0, vocab, (2, 11), generator=gen).to(device)
    expected = hf_adapter.causal_lm_forward(model, ids, torch.arange(11, device=device).expand(2, 11))[0]
    got = sol(ids).logits
    diff = (got.float() - expected.float()).abs().max().item()
    if not diff <= VERIFY_TOLERANCE.get(dtype, 1e-3):
        raise UnsupportedModelError(
            f"the rewritten graph does not reproduce {type(model).__name__} at the dense action "
            f"(max |logit diff| = {diff:.3g}); its attention or MLP does something the solc ops do not model"
        )
