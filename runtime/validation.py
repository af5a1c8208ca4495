"""Argument checks at the boundary of every public call (SOLModel.__call__, generate, score, compile).

Each check raises ArgumentError (a ValueError) or ArgumentTypeError (a TypeError) whose `argument`
names the argument and whose message gives the value and what is valid, so a bad input never reaches
torch and ends in an IndexError or a shape error from deep inside the graph.

Checks that read tensor values (token ids, action indices, positions) would synchronise an
accelerator; they run on CPU tensors always and on accelerator tensors only outside the cached decode
hot path (see `check_forward`).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import Tensor

from runtime.actions import AXES
from runtime.errors import ArgumentError, ArgumentTypeError, UnsupportedModelError

MIN_SEQ_LEN = 16  # two Quest pages; capture and the compile self-check need more than 8 positions
MAX_SEED = 2**63


def _show(value) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fail(argument: str, value, valid: str, type_error: bool = False):
    """Raise the error for `argument`=`value`, saying what is valid."""
    cls = ArgumentTypeError if type_error else ArgumentError
    raise cls(argument, f"{argument}={_show(value)} is invalid: {valid}")


# -- scalars ---------------------------------------------------------------------------------------
def check_int(argument: str, value, lo: int | None = None, hi: int | None = None, why: str = "") -> int:
    """An int (not a bool) in lo..hi (inclusive; None = unbounded); `why` explains the range."""
    valid = _int_range(lo, hi) + (f" ({why})" if why else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(argument, value, valid, type_error=True)
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        fail(argument, value, valid)
    return value


def _int_range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"an int in {lo}..{hi}" if hi >= lo else f"an int in {lo}..{hi} (an empty range here)"
    if lo is not None:
        return f"an int >= {lo}"
    return "an int" if hi is None else f"an int <= {hi}"


def check_real(argument: str, value, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number (not a bool) within the given bounds."""
    lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
    hi_s = "" if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
    valid = "a finite number" + (" " + " and ".join(s for s in (lo_s, hi_s) if s) if lo_s or hi_s else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(argument, value, valid, type_error=True)
    value = float(value)
    if not math.isfinite(value):
        fail(argument, value, valid)
    if lo is not None and (value <= lo if lo_open else value < lo):
        fail(argument, value, valid)
    if hi is not None and (value >= hi if hi_open else value > hi):
        fail(argument, value, valid)
    return value


def check_seed(value) -> int:
    return check_int("seed", value, 0, MAX_SEED - 1)


def _array_like(value) -> bool:
    """A torch tensor or a numpy array (without importing numpy)."""
    return isinstance(value, torch.Tensor) or (type(value).__module__ == "numpy" and hasattr(value, "ndim")
                                               and hasattr(value, "tolist"))


def as_python(value):
    """A torch tensor or numpy array / scalar as Python numbers (a list, or one number for 0-d); anything
    else as it is. Seeds and token ids may come as either, as HF's configs hold them."""
    return value.tolist() if _array_like(value) else value


def check_row_seeds(value, batch: int) -> None:
    """generate/score's seed: one int (one random stream for the batch) or one int per row (a list, a
    tuple, or a 1-D tensor or numpy array; a 0-d one is one int)."""
    if _array_like(value):
        if value.ndim > 1:
            fail("seed", value, f"an int, or a list of {batch} ints (one per row)")
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        seeds = list(value)
        if len(seeds) != batch:
            fail("seed", value, f"an int, or a list of {batch} ints (one per row)")
        for s in seeds:
            check_int("seed", s, 0, MAX_SEED - 1, "one per row")
    else:
        check_seed(value)


# -- compile ---------------------------------------------------------------------------------------
def check_max_seq_len(value, model_max: int, window: int | None = None) -> int:
    """The compiled context length: None picks min(model_max, 4096); else an int in MIN_SEQ_LEN..model_max.
    A sliding attention window shorter than it is not supported (the ops attend to the whole cache)."""
    if model_max < MIN_SEQ_LEN:
        fail("max_seq_len", value, f"the model holds only {model_max} positions, fewer than the {MIN_SEQ_LEN} solc needs")
    if value is None:
        value = min(model_max, 4096)
    else:
        value = check_int("max_seq_len", value, MIN_SEQ_LEN, model_max,
                          f"None for the default; at most the model's {model_max} positions")
    if window is not None and window < value:
        if window < MIN_SEQ_LEN:
            raise UnsupportedModelError(
                f"model uses a sliding attention window of {window} tokens, shorter than the smallest "
                f"max_seq_len solc compiles ({MIN_SEQ_LEN}); sliding windows are not implemented"
            )
        raise UnsupportedModelError(
            f"model uses a sliding attention window of {window} tokens, shorter than max_seq_len={value}: "
            f"pass max_seq_len in {MIN_SEQ_LEN}..{window} (sliding windows are not implemented)"
        )
    return value


# -- tensors ---------------------------------------------------------------------------------------
def _long_tensor(argument: str, value, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        fail(argument, value, f"a torch.long tensor of {what}", type_error=True)
    if value.dtype != torch.long:
        fail(argument, value, f"a torch.long tensor of {what} (convert with .long())", type_error=True)
    return value


def _values_in(argument: str, t: Tensor, lo: int, hi: int, what: str, where: str = "") -> None:
    """Every value of `t` in lo..hi (one host read)."""
    if t.numel() == 0:
        return
    mn, mx = (int(x) for x in torch.aminmax(t))
    if mn < lo or mx > hi:
        bad = mn if mn < lo else mx
        raise ArgumentError(argument, f"{argument} holds {what} {bad}; valid: {lo}..{hi}{where}")


def _device_of(sol) -> torch.device:
    return sol.token_embedding.device


def _same_device(argument: str, t: Tensor, device: torch.device) -> None:
    if t.device.type != device.type or (device.index is not None and t.device.index not in (None, device.index)):
        raise ArgumentError(argument, f"{argument} is on {t.device}, the model on {device}: move it with .to({str(device)!r})")


def check_input_ids(sol, input_ids, argument: str = "input_ids", read_values: bool = True) -> tuple[int, int]:
    """[B, T] torch.long token ids of the model's vocabulary, on the model's device; returns (B, T)."""
    t = _long_tensor(argument, input_ids, "token ids [batch, seq]")
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        fail(argument, t, "a 2-D [batch >= 1, seq >= 1] tensor of token ids (add a batch dim with ids[None])")
    _same_device(argument, t, _device_of(sol))
    if read_values:
        _values_in(argument, t, 0, int(sol.token_embedding.shape[0]) - 1, "token id")
    return int(t.shape[0]), int(t.shape[1])


def check_actions(actions, shape: tuple[int, int], n_actions: int, device: torch.device, read_values: bool = True) -> None:
    """Action indices [B, T] (exactly the ids' shape: no broadcasting), each in 0..n_actions-1."""
    t = _long_tensor("actions", actions, f"action indices of shape {list(shape)}")
    if tuple(t.shape) != tuple(shape):
        fail("actions", t, f"one action index per token: shape {list(shape)} like input_ids (no broadcasting)")
    _same_device("actions", t, device)
    if read_values:
        _values_in("actions", t, 0, n_actions - 1, "action index", f" (the dense action is {n_actions - 1})")


def check_forward(sol, input_ids, actions, position_ids, cache) -> None:
    """The arguments of SOLModel.__call__. Values are read except for accelerator tensors of a cached
    step (the decode hot path; an out-of-range value there is the caller's bug, not a user input) and
    under torch.compile."""
    from runtime.kv_cache import StaticKVCache

    hot = (cache is not None and isinstance(input_ids, Tensor) and input_ids.device.type != "cpu") \
        or torch.compiler.is_compiling()  # a traced value check would be a data-dependent guard
    batch, seq = check_input_ids(sol, input_ids, read_values=not hot)
    device = input_ids.device
    if actions is not None:
        check_actions(actions, (batch, seq), len(sol.space), device, read_values=not hot)
    if cache is not None and not isinstance(cache, StaticKVCache):
        fail("cache", cache, "None or a StaticKVCache from sol.new_cache(batch, max_len)", type_error=True)
    if cache is not None and cache.batch != batch:
        raise ArgumentError("cache", f"cache holds {cache.batch} rows, input_ids {batch}: make it with sol.new_cache({batch}, ...)")
    if cache is None and seq > sol.max_seq_len:
        raise ArgumentError("input_ids", f"input_ids has {seq} tokens, more than the compiled max_seq_len={sol.max_seq_len}")
    if position_ids is None:
        return
    limit = cache.max_len if cache is not None else seq
    t = _long_tensor("position_ids", position_ids, f"positions of shape {[batch, seq]}")
    if tuple(t.shape) != (batch, seq):
        fail("position_ids", t, f"one position per token: shape {[batch, seq]} like input_ids")
    _same_device("position_ids", t, device)
    if not hot:
        where = f" (the cache's {limit} slots)" if cache is not None else f" (the {seq} tokens given; pass a cache for later positions)"
        _values_in("position_ids", t, 0, limit - 1, "position", where)


# -- budgets, sampling, schedules ------------------------------------------------------------------
def check_budget(budget, batch: int) -> None:
    """A budget: a number in (0, 1] for every axis, a dict {axis: number}, or a [3] / [batch, 3]
    sequence or tensor of numbers in (0, 1] (attn keep, mlp keep, bits/16)."""
    valid = (f"a number in (0, 1], a dict {{axis: number in (0, 1]}} over {list(AXES)}, "
             f"or [3] / [{batch}, 3] numbers in (0, 1] (attn, mlp, bits/16)")
    if budget is None:
        return
    if isinstance(budget, Mapping):
        unknown = [k for k in budget if k not in AXES]
        if unknown:
            raise ArgumentError("budget", f"budget has unknown axes {unknown}; valid axes: {list(AXES)}")
        for axis, v in budget.items():
            try:
                check_real(f"budget[{axis!r}]", v, 0.0, 1.0, lo_open=True)
            except ArgumentError as e:
                raise type(e)("budget", str(e)) from None
        return
    if isinstance(budget, (bool, str, bytes)):
        fail("budget", budget, valid, type_error=True)
    if isinstance(budget, numbers.Real):
        check_real("budget", budget, 0.0, 1.0, lo_open=True)
        return
    if not isinstance(budget, (Tensor, list, tuple)):
        fail("budget", budget, valid, type_error=True)
    if isinstance(budget, Tensor) and (budget.dtype == torch.bool or budget.is_complex()):
        fail("budget", budget, valid, type_error=True)
    try:
        t = torch.as_tensor(budget, dtype=torch.float64) if not isinstance(budget, Tensor) else budget.double()
    except (TypeError, ValueError, RuntimeError, OverflowError):
        fail("budget", budget, valid, type_error=True)
    if not (tuple(t.shape) in ((3,), (batch, 3)) or t.dim() == 0):
        fail("budget", budget, valid)
    if not bool(((t > 0) & (t <= 1)).all()):  # also rejects NaN
        fail("budget", budget, valid)


def check_sampling(temperature, top_k, top_p) -> None:
    check_real("temperature", temperature, 0.0, None)
    if top_k is not None:
        check_int("top_k", top_k, 1, None)
    if top_p is not None:
        check_real("top_p", top_p, 0.0, 1.0, lo_open=True)


def check_schedule(schedule, batch: int, steps: int, n_actions: int) -> None:
    """Action indices [steps'] or [batch, steps'] with steps' >= steps, each in 0..n_actions-1."""
    valid = f"action indices [>= {steps}] or [{batch}, >= {steps}], each in 0..{n_actions - 1}"
    if isinstance(schedule, Tensor):
        t = schedule
    elif isinstance(schedule, (list, tuple)):
        try:
            t = torch.as_tensor(schedule)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            fail("schedule", schedule, valid, type_error=True)
    else:
        fail("schedule", schedule, valid, type_error=True)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        fail("schedule", schedule, valid, type_error=True)
    ok = (t.dim() == 1 and t.shape[0] >= steps) or (t.dim() == 2 and t.shape[0] == batch and t.shape[1] >= steps)
    if not ok:
        fail("schedule", t, valid)
    _values_in("schedule", t, 0, n_actions - 1, "action index")


def check_sources(policy, schedule, budget, batch: int, steps: int, n_actions: int, cost_budget: bool = False) -> None:
    """Who picks the actions: a policy (ActionSource), a schedule, a budget (Fixed), or nothing (dense).
    A cost budget's range is the cost model's (runtime.budget.BudgetSpec.targets checks it), not (0, 1]."""
    from runtime.schedulers import ActionSource

    if policy is not None and not isinstance(policy, ActionSource):
        hint = " (wrap a PolicyNet: PolicySource(policy))" if isinstance(policy, torch.nn.Module) else ""
        fail("policy", policy, f"None or an ActionSource (PolicySource, Fixed, Random, Schedule){hint}", type_error=True)
    if policy is not None and schedule is not None:
        raise ArgumentError("schedule", "pass either policy= or schedule=, not both")
    if schedule is not None and budget is not None:
        raise ArgumentError("budget", "pass either schedule= or budget=, not both: a schedule fixes every action, "
                                      "so there is no budget for it to meet")
    if schedule is not None:
        check_schedule(schedule, batch, steps, n_actions)
    if not cost_budget:
        check_budget(budget, batch)


def _check_decode(sol, prompt_len: int, steps: int) -> None:
    if prompt_len + steps - 1 > sol.max_seq_len:
        raise ArgumentError(
            "max_new_tokens", f"prompt ({prompt_len} tokens) + max_new_tokens ({steps}) - 1 = {prompt_len + steps - 1} "
            f"exceeds the compiled max_seq_len={sol.max_seq_len}")


def _check_prompts(sol, input_ids, attention_mask) -> tuple[int, int]:
    """input_ids as a [B, P] tensor (left-padded with its 0/1 `attention_mask` when prompts differ) or a
    list of prompts (each a list of ints or a 1-D torch.long tensor); returns (batch, longest prompt)."""
    if isinstance(input_ids, (list, tuple)):
        valid = "a [batch, seq] torch.long tensor or a non-empty list of prompts (lists of ints or 1-D long tensors)"
        if len(input_ids) == 0:
            fail("input_ids", input_ids, valid)
        if attention_mask is not None:
            fail("attention_mask", attention_mask, "None with a list of prompts (the mask goes with a padded tensor)")
        vocab = int(sol.token_embedding.shape[0])
        longest = 0
        for i, prompt in enumerate(input_ids):
            name = f"input_ids[{i}]"
            if isinstance(prompt, Tensor):
                t = _long_tensor(name, prompt, "token ids [seq]")
                if t.dim() != 1 or t.numel() < 1:
                    fail(name, t, "a 1-D tensor of at least one token id")
                _same_device(name, t, _device_of(sol))
                _values_in(name, t, 0, vocab - 1, "token id")
                n = t.numel()
            elif isinstance(prompt, (list, tuple)) and len(prompt) == 0:
                fail(name, prompt, "a prompt of at least one token id")
            elif isinstance(prompt, (list, tuple)):
                for tok in prompt:
                    check_int(name, tok, 0, vocab - 1, "token ids of the model's vocabulary")
                n = len(prompt)
            else:
                fail(name, prompt, "at least one token: a non-empty list of token ids or a 1-D torch.long tensor",
                     type_error=not isinstance(prompt, (list, tuple)))
            longest = max(longest, n)
        return len(input_ids), longest
    batch, prompt = check_input_ids(sol, input_ids)
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (batch, prompt):
            fail("attention_mask", attention_mask, f"a [{batch}, {prompt}] 0/1 tensor like input_ids (left padding)",
                 type_error=not isinstance(attention_mask, Tensor))
        if attention_mask.is_floating_point() or attention_mask.is_complex() or not bool(
                ((attention_mask == 0) | (attention_mask == 1)).all()):
            fail("attention_mask", attention_mask, "integer or bool values 0 (padding) and 1 (a token)")
    return batch, prompt


def _check_token_ids(sol, argument: str, value) -> None:
    vocab = int(sol.token_embedding.shape[0])
    if _array_like(value) and value.ndim <= 1:  # a tensor or numpy array of ids, as HF's configs hold them
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        for v in value:
            check_int(argument, v, 0, vocab - 1, "token ids of the model's vocabulary")
    else:
        check_int(argument, value, 0, vocab - 1, "a token id of the model's vocabulary, or a list of them")


def check_generate(sol, input_ids, policy, schedule, budget, max_new_tokens, temperature, top_k, top_p,
                   eos_token_id, seed, attention_mask=None, pad_token_id=None, cost_budget: bool = False) -> None:
    """Every argument of generate()."""
    batch, prompt = _check_prompts(sol, input_ids, attention_mask)
    steps = check_int("max_new_tokens", max_new_tokens, 1, None)
    _check_decode(sol, prompt, steps)
    check_sampling(temperature, top_k, top_p)
    if eos_token_id is not None:
        _check_token_ids(sol, "eos_token_id", eos_token_id)
    if pad_token_id is not None:
        check_int("pad_token_id", pad_token_id, 0, int(sol.token_embedding.shape[0]) - 1)
    check_row_seeds(seed, batch)
    check_sources(policy, schedule, budget, batch, steps, len(sol.space), cost_budget)


def check_score(sol, tokens, prompt_len, policy, schedule, budget, seed, cost_budget: bool = False) -> None:
    """Every argument of score()."""
    batch, length = check_input_ids(sol, tokens, argument="tokens")
    if length < 2:
        fail("tokens", tokens, "[batch, length >= 2]: a prompt and at least one token to score")
    prompt_len = check_int("prompt_len", prompt_len, 1, length - 1)
    _check_decode(sol, prompt_len, length - prompt_len)
    check_row_seeds(seed, batch)
    check_sources(policy, schedule, budget, batch, length - prompt_len, len(sol.space), cost_budget)
