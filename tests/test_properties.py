"""Property-based tests (hypothesis) of what a user can type: compile, SOLModel.__call__, generate,
score, export/load and the grpo / evaluate command lines.

Every call either succeeds (and then the input was valid by an independent oracle, and the output
has the promised shape) or raises an error of solc's own that names an argument that was invalid.
Never an IndexError, AssertionError, ZeroDivisionError or KeyError, and never an error raised inside
torch, transformers or torch.export. Examples are derandomized so the suite is reproducible.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import numbers
import shutil
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import solc
from runtime.actions import AXES
from runtime.errors import ArgumentError, AssetError, SolcError
from runtime.kv_cache import StaticKVCache
from runtime.policy import PolicyConfig, PolicyNet, PolicySource
from runtime.schedulers import ActionSource, Fixed, Random

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = (IndexError, AssertionError, ZeroDivisionError, KeyError)
VOCAB, N_ACTIONS, MAX_LEN = 256, 27, 32


def fast(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=None)
def tiny():
    """The compiled tiny model (built once per test session) and a small policy for it."""
    sol = solc.compile(solc.load_model("tiny-llama"), max_seq_len=MAX_LEN)
    torch.manual_seed(0)
    policy = PolicyNet(PolicyConfig.for_model(sol, d_model=16, n_heads=2, scalar_hidden=8)).eval()
    return sol, policy


def outcome(fn, *args, **kwargs):
    """(result, None) or (None, error) for an error solc raised on purpose; fails the test otherwise."""
    try:
        return fn(*args, **kwargs), None
    except FORBIDDEN as e:
        raise AssertionError(f"forbidden {type(e).__name__}: {e}") from e
    except (SolcError, ValueError, TypeError) as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        ours = str(REPO) in frame.filename and "site-packages" not in frame.filename
        deliberate = isinstance(e, SolcError) or (ours and (frame.line or "").strip().startswith("raise"))
        assert deliberate, f"{type(e).__name__} from {frame.filename}:{frame.lineno} ({frame.line}): {e}"
        return None, e


def named(error: Exception, invalid: set[str]) -> bool:
    """The error names one of the invalid arguments."""
    if isinstance(error, ArgumentError):
        return error.argument in invalid or any(name in str(error) for name in invalid)
    return any(name in str(error) for name in invalid)


def check(error, invalid: set[str], result, on_success=None):
    event("valid" if not invalid else "invalid")
    if invalid:
        assert error is not None, f"accepted invalid {sorted(invalid)}"
        assert named(error, invalid), f"error does not name any of {sorted(invalid)}: {error!r}"
    else:
        assert error is None, f"valid input refused: {error!r}"
        if on_success is not None:
            on_success(result)


# -- values a user might type ----------------------------------------------------------------------
junk = st.one_of(st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=4), st.lists(st.integers(-3, 40), max_size=3), st.just(object()))


def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


@st.composite
def tensors(draw, max_dims=3, lo=-2, hi=VOCAB + 3, valid_shape=None, max_side=12):
    """Integer tensors, mostly torch.long of `valid_shape`, sometimes another dtype or shape."""
    if valid_shape is not None and draw(st.booleans()):
        shape = valid_shape
    else:
        shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=0, max_size=max_dims)))
    dtype = draw(st.sampled_from([torch.long] * 6 + [torch.int32, torch.float32, torch.bool]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    in_range = draw(st.booleans()) or draw(st.booleans())
    lo_, hi_ = (0, valid_hi(hi)) if in_range else (lo, hi)
    return torch.randint(lo_, max(hi_, lo_ + 1), shape, generator=g).to(dtype)


def valid_hi(hi):
    return {VOCAB + 3: VOCAB, N_ACTIONS + 3: N_ACTIONS, MAX_LEN + 3: MAX_LEN}.get(hi, hi)


def long_values_in(t, lo, hi) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.long and (t.numel() == 0 or (int(t.min()) >= lo and int(t.max()) < hi))


def ids_ok(t) -> bool:
    return long_values_in(t, 0, VOCAB) and t.dim() == 2 and t.shape[0] >= 1 and t.shape[1] >= 1


# -- SOLModel.__call__ -----------------------------------------------------------------------------
def valid_tensor(draw, shape, hi):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randint(0, hi, shape, generator=g)


def perturbed(draw, valid: dict, wild: dict) -> dict:
    """`valid` arguments with none (a quarter of the time), one or two of them replaced by a draw
    from `wild` (values a user might type, valid or not)."""
    n = draw(st.sampled_from([0, 1, 1, 1, 2]))
    names = draw(st.lists(st.sampled_from(sorted(wild)), min_size=n, max_size=n, unique=True))
    return {**valid, **{name: draw(wild[name]) for name in names}}


@st.composite
def forward_args(draw):
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 10))
    use_cache = draw(st.booleans())
    valid = dict(
        ids=valid_tensor(draw, (batch, seq), VOCAB),
        actions=draw(st.sampled_from([None, valid_tensor(draw, (batch, seq), N_ACTIONS)])),
        positions=torch.arange(seq).expand(batch, seq) if use_cache else None,
        cache=(batch, MAX_LEN) if use_cache else None,
    )
    wild = dict(
        ids=st.one_of(tensors(valid_shape=(batch, seq)), junk),
        actions=st.one_of(st.none(), tensors(lo=-2, hi=N_ACTIONS + 3, valid_shape=(batch, seq)), junk),
        positions=st.one_of(st.none(), tensors(lo=-2, hi=MAX_LEN + 3, valid_shape=(batch, seq)), junk),
        cache=st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(seq, MAX_LEN))),
    )
    kw = perturbed(draw, valid, wild)
    return kw["ids"], kw["actions"], kw["positions"], kw["cache"]


@fast(120)
@given(forward_args())
@example((torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), -1), None, None))   # -1 is not "dense"
@example((torch.zeros(2, 4, dtype=torch.long), torch.zeros(4, dtype=torch.long), None, None))  # no broadcasting
@example((torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), 27), None, None))
def test_forward(args):
    sol, _ = tiny()
    ids, actions, positions, cache_shape = args
    cache = sol.new_cache(*cache_shape) if cache_shape else None
    invalid = set()
    if not ids_ok(ids) or (cache is None and ids.shape[1] > MAX_LEN):
        invalid.add("input_ids")
    else:
        shape = tuple(ids.shape)
        if actions is not None and not (long_values_in(actions, 0, N_ACTIONS) and tuple(actions.shape) == shape):
            invalid.add("actions")
        if cache is not None and cache.batch != shape[0]:
            invalid.add("cache")
        limit = cache.max_len if cache is not None else shape[1]
        if positions is None and cache is not None:
            invalid.add("position_ids")
        if positions is not None and not (long_values_in(positions, 0, limit) and tuple(positions.shape) == shape):
            invalid.add("position_ids")
    with torch.no_grad():
        result, error = outcome(sol, ids, actions, positions, cache)

    def shaped(out):
        assert out.logits.shape == (*ids.shape, VOCAB)
        # A fresh cache holds nothing: tokens placed after unwritten slots attend to never-written
        # pages (the cache does not track what it holds), so only a gap-free call must be finite.
        if positions is None or torch.equal(positions, torch.arange(ids.shape[1]).expand(ids.shape)):
            assert bool(torch.isfinite(out.logits).all())

    check(error, invalid, result, shaped)


# -- generate and score ----------------------------------------------------------------------------
def cost_request(b, policy) -> bool:
    """One number (or one per row) with no policy: a cost fraction; a dict, three numbers per row or a
    baseline source (Fixed, Random): the paper's per-axis keeps."""
    if b is None or policy is not None or isinstance(b, dict):
        return False
    try:
        t = torch.as_tensor(b, dtype=torch.float64) if not isinstance(b, (str, bytes, bool)) else None
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return True
    return t is None or not (t.dim() == 2 or (t.dim() == 1 and t.shape[0] == 3))


def cost_budget_ok(b, batch) -> bool:
    """A cost fraction in [cheapest action's cost, 1] (under the tiny model's bytes cost model)."""
    from runtime.budget import default_cost_spec

    sol, _ = tiny()
    lo, hi = default_cost_spec(sol).feasible_range(sol.space)
    if isinstance(b, (bool, str, bytes)):
        return False
    try:
        t = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return False
    if isinstance(b, torch.Tensor) and (b.dtype == torch.bool or b.is_complex()):
        return False
    return t.numel() in (1, batch) and bool(((t >= lo - 1e-9) & (t <= hi + 1e-9)).all())


def budget_ok(b, batch, policy=None) -> bool:
    if b is None:
        return True
    if cost_request(b, policy):
        return cost_budget_ok(b, batch)
    if isinstance(b, dict):
        return all(k in AXES for k in b) and all(is_real(v) and 0 < v <= 1 for v in b.values())
    if isinstance(b, (bool, str)):
        return False
    if is_real(b):
        return 0 < b <= 1
    if isinstance(b, torch.Tensor):
        t = b
        if t.dtype == torch.bool:
            return False
    elif isinstance(b, (list, tuple)):
        try:
            t = torch.tensor(b, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            return False
    else:
        return False
    t = t.double()
    return (t.dim() == 0 or tuple(t.shape) in ((3,), (batch, 3))) and bool(((t > 0) & (t <= 1)).all())


budgets = st.one_of(st.none(), st.floats(-0.5, 1.5), st.floats(allow_nan=True), st.text(max_size=2), st.booleans(),
                    st.lists(st.floats(0.05, 1.0), max_size=4), st.lists(st.lists(st.floats(0.0, 1.2), min_size=3, max_size=3), max_size=3),
                    st.dictionaries(st.sampled_from(["attn", "mlp", "quant", "bits"]), st.one_of(st.floats(-0.2, 1.2), st.text(max_size=1)), max_size=3))


def schedule_ok(s, batch, steps) -> bool:
    if isinstance(s, (list, tuple)):
        try:
            s = torch.tensor(s)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            return False
    if not isinstance(s, torch.Tensor) or s.dtype == torch.bool or s.is_floating_point():
        return False
    shape_ok = (s.dim() == 1 and s.shape[0] >= steps) or (s.dim() == 2 and s.shape[0] == batch and s.shape[1] >= steps)
    return shape_ok and (s.numel() == 0 or (int(s.min()) >= 0 and int(s.max()) < N_ACTIONS))


schedules = st.one_of(st.none(), st.lists(st.integers(-1, N_ACTIONS), max_size=12),
                      tensors(max_dims=2, lo=-1, hi=N_ACTIONS + 3, max_side=12), junk)


@st.composite
def policies(draw):
    _, policy = tiny()
    kind = draw(st.sampled_from(["none", "none", "source", "fixed", "random", "raw", "junk"]))
    return {"none": None, "source": PolicySource(policy), "fixed": Fixed(), "random": Random(), "raw": policy,
            "junk": draw(junk)}[kind]


def sources_invalid(policy, schedule, budget, batch, steps) -> set:
    invalid = set()
    if policy is not None and not isinstance(policy, ActionSource):
        invalid.add("policy")
    if policy is not None and schedule is not None:
        invalid |= {"policy", "schedule"}
    if schedule is not None and budget is not None:
        invalid |= {"schedule", "budget"}
    if schedule is not None and not schedule_ok(schedule, batch, steps):
        invalid.add("schedule")
    if not budget_ok(budget, batch, policy):
        invalid.add("budget")
    return invalid


def valid_source(draw, batch, steps):
    """(policy, schedule, budget): one of the valid ways to pick the actions."""
    _, policy = tiny()
    kind = draw(st.sampled_from(["dense", "budget", "policy", "schedule", "fixed"]))
    budget = draw(st.one_of(st.floats(0.1, 1.0), st.just({"attn": 0.5}), st.just([0.5, 0.8, 0.5])))
    if kind == "budget" and not isinstance(budget, (dict, list)):
        budget = draw(st.floats(0.45, 1.0))  # a cost fraction: the tiny model's cheapest action costs 0.44
    if kind == "schedule":
        return None, valid_tensor(draw, (steps,), N_ACTIONS), None
    return {"dense": (None, None, None), "budget": (None, None, budget), "policy": (PolicySource(policy), None, budget),
            "fixed": (Fixed(), None, budget)}[kind]


@st.composite
def generate_args(draw):
    batch, prompt, steps = draw(st.integers(1, 2)), draw(st.integers(1, 8)), draw(st.integers(1, 6))
    policy, schedule, budget = valid_source(draw, batch, steps)
    valid = dict(input_ids=valid_tensor(draw, (batch, prompt), VOCAB), policy=policy, schedule=schedule, budget=budget,
                 max_new_tokens=steps, temperature=draw(st.sampled_from([0.0, 0.7, 1.3])),
                 top_k=draw(st.sampled_from([None, 1, 50])), top_p=draw(st.sampled_from([None, 0.9, 1.0])),
                 eos_token_id=draw(st.sampled_from([None, 3])), seed=draw(st.integers(0, 100)))
    wild = dict(
        input_ids=st.one_of(tensors(valid_shape=(batch, prompt)), junk),
        policy=policies(),
        schedule=st.one_of(st.none(), schedules),
        budget=st.one_of(st.none(), budgets),
        max_new_tokens=st.one_of(st.integers(-2, 40), junk),
        temperature=st.one_of(st.floats(-1.0, 2.0), st.floats(allow_nan=True, allow_infinity=True), junk),
        top_k=st.one_of(st.none(), st.integers(-1, 300), junk),
        top_p=st.one_of(st.none(), st.floats(-1.0, 2.0), st.floats(allow_nan=True)),
        eos_token_id=st.one_of(st.none(), st.integers(-2, VOCAB + 2), junk),
        seed=st.one_of(st.integers(-(2**64), 2**65), junk),
    )
    return perturbed(draw, valid, wild)


@fast(150)
@given(generate_args())
@example(dict(input_ids=torch.zeros(1, 3, dtype=torch.long), policy=None, schedule=None, budget=None, max_new_tokens=4,
              temperature=1.0, top_k=0, top_p=None, eos_token_id=None, seed=0))
@example(dict(input_ids=torch.zeros(1, 3, dtype=torch.long), policy=None, schedule=None, budget=None, max_new_tokens=4,
              temperature=1.0, top_k=None, top_p=0.0, eos_token_id=None, seed=0))
@example(dict(input_ids=torch.zeros(1, 3, dtype=torch.long), policy=None, schedule=None, budget=None, max_new_tokens=4,
              temperature=float("nan"), top_k=None, top_p=None, eos_token_id=None, seed=0))
@example(dict(input_ids=torch.zeros(1, 3, dtype=torch.long), policy=None, schedule=None, budget=None, max_new_tokens=4,
              temperature=1.0, top_k=None, top_p=1.5, eos_token_id=None, seed=0))
@example(dict(input_ids=torch.zeros(1, 3, dtype=torch.long), policy=None, schedule=None, budget="x", max_new_tokens=4,
              temperature=0.0, top_k=None, top_p=None, eos_token_id=None, seed=0))
@example(dict(input_ids=torch.zeros(1, 3, dtype=torch.long), policy=None, schedule=None, budget=[0.5, 0.5], max_new_tokens=4,
              temperature=0.0, top_k=None, top_p=None, eos_token_id=None, seed=0))
@example(dict(input_ids=torch.zeros(1, 3, dtype=torch.long), policy=None, schedule=[0, 1, 2, 3], budget=0.5, max_new_tokens=4,
              temperature=0.0, top_k=None, top_p=None, eos_token_id=None, seed=0))
def test_generate(kw):
    sol, _ = tiny()
    ids, steps = kw["input_ids"], kw["max_new_tokens"]
    invalid = set()
    if not ids_ok(ids):
        invalid.add("input_ids")
    if not (is_int(steps) and steps >= 1):
        invalid.add("max_new_tokens")
    elif ids_ok(ids) and ids.shape[1] + steps - 1 > MAX_LEN:
        invalid.add("max_new_tokens")
    if not (is_real(kw["temperature"]) and kw["temperature"] >= 0):
        invalid.add("temperature")
    if kw["top_k"] is not None and not (is_int(kw["top_k"]) and kw["top_k"] >= 1):
        invalid.add("top_k")
    if kw["top_p"] is not None and not (is_real(kw["top_p"]) and 0 < kw["top_p"] <= 1):
        invalid.add("top_p")
    eos = kw["eos_token_id"]
    eos_list = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if eos is not None and not all(is_int(e) and 0 <= e < VOCAB for e in eos_list):
        invalid.add("eos_token_id")
    if not (is_int(kw["seed"]) and 0 <= kw["seed"] < 2**63):
        invalid.add("seed")
    if ids_ok(ids) and is_int(steps) and steps >= 1:
        invalid |= sources_invalid(kw["policy"], kw["schedule"], kw["budget"], ids.shape[0], steps)
    result, error = outcome(sol.generate, **kw)

    def shaped(out):
        assert out.tokens.shape[0] == ids.shape[0] and ids.shape[1] < out.tokens.shape[1] <= ids.shape[1] + steps
        assert torch.equal(out.tokens[:, : ids.shape[1]], ids)
        assert int(out.tokens.min()) >= 0 and int(out.tokens.max()) < VOCAB
        assert int(out.actions.max()) < N_ACTIONS and int(out.actions.min()) >= -1

    check(error, invalid, result, shaped)


@st.composite
def score_args(draw):
    batch, length = draw(st.integers(1, 2)), draw(st.integers(2, 12))
    prompt_len = draw(st.integers(1, length - 1))
    policy, schedule, budget = valid_source(draw, batch, length - prompt_len)
    valid = dict(tokens=valid_tensor(draw, (batch, length), VOCAB), prompt_len=prompt_len, policy=policy,
                 schedule=schedule, budget=budget, seed=draw(st.integers(0, 9)))
    wild = dict(tokens=st.one_of(tensors(valid_shape=(batch, length)), junk), prompt_len=st.one_of(st.integers(-1, 14), junk),
                policy=policies(), schedule=st.one_of(st.none(), schedules), budget=st.one_of(st.none(), budgets),
                seed=st.one_of(st.integers(-3, 2**64), junk))
    return perturbed(draw, valid, wild)


@fast(100)
@given(score_args())
def test_score(kw):
    from runtime.generate import score

    sol, _ = tiny()
    tokens, prompt_len = kw["tokens"], kw["prompt_len"]
    invalid = set()
    if not ids_ok(tokens) or tokens.shape[1] < 2:
        invalid.add("tokens")
    elif not (is_int(prompt_len) and 1 <= prompt_len < tokens.shape[1]):
        invalid.add("prompt_len")
    elif tokens.shape[1] - 1 > MAX_LEN:
        invalid.add("max_new_tokens")
    if not (is_int(kw["seed"]) and 0 <= kw["seed"] < 2**63):
        invalid.add("seed")
    if ids_ok(tokens) and tokens.shape[1] >= 2 and is_int(prompt_len) and 1 <= prompt_len < tokens.shape[1]:
        invalid |= sources_invalid(kw["policy"], kw["schedule"], kw["budget"], tokens.shape[0], tokens.shape[1] - prompt_len)
    result, error = outcome(score, sol, **kw)

    def shaped(out):
        assert torch.equal(out.tokens, tokens) and out.logprobs.shape == (tokens.shape[0], tokens.shape[1] - prompt_len)
        assert bool((out.logprobs <= 0).all())

    check(error, invalid, result, shaped)


# -- compile ---------------------------------------------------------------------------------------
@st.composite
def compile_args(draw):
    valid = dict(max_seq_len=draw(st.sampled_from([None, 16, 40])), actions=draw(st.sampled_from([("attn", "mlp", "quant"), ["mlp"], "quant"])),
                 levels=None)
    wild = dict(max_seq_len=st.one_of(st.none(), st.integers(-5, 40), st.integers(1000, 5000), st.floats(-1, 40), junk),
                actions=st.one_of(st.lists(st.sampled_from(["attn", "mlp", "quant", "bits", ""]), max_size=3), junk),
                levels=st.one_of(st.none(), st.dictionaries(st.sampled_from(["attn", "mlp", "quant"]),
                                                             st.lists(st.one_of(st.floats(0, 1.2), st.integers(0, 20)), max_size=3),
                                                             max_size=2), junk))
    return perturbed(draw, valid, wild)


@fast(25)
@given(compile_args())
@example(dict(max_seq_len=0, actions=("attn", "mlp", "quant"), levels=None))
@example(dict(max_seq_len=2.5, actions=("attn", "mlp", "quant"), levels=None))
@example(dict(max_seq_len=8, actions=("attn", "mlp", "quant"), levels=None))
@example(dict(max_seq_len=1025, actions=("attn", "mlp", "quant"), levels=None))
def test_compile(kw):
    from runtime.actions import ActionSpace

    max_seq_len, actions, levels = kw["max_seq_len"], kw["actions"], kw["levels"]
    result, error = outcome(solc.compile, tiny_model(), **kw)
    invalid = set()
    if not (max_seq_len is None or (is_int(max_seq_len) and 16 <= max_seq_len <= 1024)):
        invalid.add("max_seq_len")
    try:
        ActionSpace([actions] if isinstance(actions, str) else list(actions) if isinstance(actions, (list, tuple)) else actions, levels)
    except (ValueError, TypeError):
        invalid |= {"actions", "levels"}

    def compiled(sol):
        assert sol.max_seq_len == (max_seq_len or 1024)
        ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(sol(ids).logits, tiny_model()(ids).logits, atol=1e-4, rtol=0)

    check(error, invalid, result, compiled)


@functools.lru_cache(maxsize=None)
def tiny_model():
    return solc.load_model("tiny-llama")


def test_compile_refuses_models_it_cannot_run():
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, d_kv=16))
    with torch.device("meta"):
        meta = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, vocab_size=100))
    for model, message in ((bert, "not a causal language model"), (t5, "encoder-decoder"), (meta, "meta device"),
                           (torch.nn.Linear(2, 2), "not a Hugging Face")):
        _, error = outcome(solc.compile, model)
        assert isinstance(error, solc.UnsupportedModelError) and message in str(error), error
    _, error = outcome(solc.compile, "smollm2-135m")
    assert isinstance(error, TypeError) and "model" in str(error)


# -- export / load ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    sol, policy = tiny()
    return solc.export(sol, policy, tmp_path_factory.mktemp("art") / "tiny")


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 5000), st.floats(allow_nan=False), st.text(max_size=3)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
                           max_leaves=6)


@fast(20)
@given(key=st.sampled_from(["format", "format_version", "versions", "space", "dtype", "max_seq_len", "pipeline_uuid",
                            "policy", "cost_table", "files", "program", "model_config"]),
       action=st.sampled_from(["drop", "replace", "replace", "unsealed"]), value=json_values)
def test_load_of_an_edited_manifest(artifact, key, action, value):
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(shutil.copytree(artifact, Path(tmp) / "copy"))
        manifest = json.loads((dst / "manifest.json").read_text())
        if action == "drop":
            manifest.pop(key)
        else:
            manifest[key] = value
        text = json.dumps(manifest).encode()
        (dst / "manifest.json").write_bytes(text)
        if action != "unsealed":
            (dst / "manifest.sha256").write_text(hashlib.sha256(text).hexdigest())
        result, error = outcome(solc.load, dst)
        if action == "unsealed" or action == "drop":
            assert isinstance(error, AssetError), error
        if error is not None:
            assert isinstance(error, AssetError) and ("manifest" in str(error) or "re-export" in str(error)), error


@st.composite
def export_args(draw):
    valid = dict(target=draw(st.sampled_from(["new", "empty", "artifact", "nested"])), policy=draw(st.sampled_from(["none", "policy"])),
                 programs=False, path_kind=draw(st.sampled_from(["path", "str"])))
    wild = dict(target=st.sampled_from(["foreign", "file"]), policy=st.sampled_from(["junk", "other-space"]),
                programs=st.one_of(st.just(True), junk), path_kind=st.just("junk"))
    return perturbed(draw, valid, wild)


@fast(12)
@given(export_args())
def test_export_arguments(artifact, kw):
    target, policy, programs, path_kind = kw["target"], kw["policy"], kw["programs"], kw["path_kind"]
    sol, tiny_policy = tiny()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "a" / "b" if target == "nested" else root / "out"
        if target == "empty":
            path.mkdir()
        elif target == "foreign":
            path.mkdir()
            (path / "mine.txt").write_text("keep")
        elif target == "file":
            path.write_text("keep")
        elif target == "artifact":
            shutil.copytree(artifact, path)
        other = PolicyNet(PolicyConfig(d_base=64, space={"version": 1, "axes": ["mlp"], "levels": {"mlp": [0.5, 1.0]}},
                                       d_model=16, n_heads=2))
        policy_value = {"none": None, "policy": tiny_policy, "junk": "policy", "other-space": other}[policy]
        path_value = {"path": path, "str": str(path), "junk": 42}[path_kind]
        invalid = set()
        if policy in ("junk", "other-space"):
            invalid.add("policy")
        if programs is not False and not isinstance(programs, bool):
            invalid.add("programs")
        if path_kind == "junk" or target in ("foreign", "file"):
            invalid.add("path")
        before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        result, error = outcome(solc.export, sol, policy_value, path_value, programs=programs)
        check(error, invalid, result)
        if invalid:
            assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before  # nothing written or removed
        if target == "foreign":
            assert (path / "mine.txt").read_text() == "keep"
        if target == "file":
            assert path.read_text() == "keep"


# -- command lines ---------------------------------------------------------------------------------
words = st.one_of(st.integers(-3, 300).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                  st.sampled_from(["0", "1", "nan", "inf", "", "{}", "{bad", '{"quant": [4, 16]}', "attn,mlp", "0.2,0.9",
                                   "0.9,0.1", "float64", "int8", "cpu", "tpu", "auto", "anchored", "x"]),
                  st.text(max_size=5).filter(lambda s: not s.startswith("-")))


def cli_flags(parser):
    """--flag -> None for a switch, else a strategy of words for it (typed numbers or anything)."""
    typed = {int: st.integers(-2, 300).map(str), float: st.one_of(st.floats(-1.0, 2.0).map(str), st.sampled_from(["nan", "inf"]))}
    out = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt not in ("--help", "--config", "--resume", "--no-resume", "--overwrite",
                                                    "--no-overwrite", "--policy"):
                out[opt] = None if action.nargs == 0 else st.one_of(typed.get(action.type, words), words)
    return out


def run_cli(parse, argv):
    """(config, error, argparse stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cfg, error = outcome(parse, argv)
        except SystemExit as e:
            assert e.code == 2
            return None, None, err.getvalue()
    return cfg, error, ""


def parsed_or_refused(config_from_args, argv, chosen):
    """The config a command line parses to, or None after checking its refusal names a chosen flag (argparse's
    usage error or solc's own)."""
    cfg, error, usage = run_cli(config_from_args, argv)
    event("argparse" if usage else "error" if error is not None else "accepted")
    if usage:
        assert any(flag in usage for flag in chosen), usage
        return None
    if error is not None:
        assert named(error, set(chosen)), (argv, error)
        return None
    return cfg


@fast(300)
@given(st.data())
def test_grpo_command_line(data):
    from training import grpo

    flags = cli_flags(grpo._parser())
    chosen = data.draw(st.lists(st.sampled_from(sorted(flags)), max_size=4, unique=True))
    argv = []
    for flag in chosen:
        argv += [flag] if flags[flag] is None else [flag, data.draw(flags[flag])]
    cfg = parsed_or_refused(grpo.config_from_args, argv, chosen)
    if cfg is None:
        return
    # accepted: every value is valid
    assert cfg.checkpoint_every >= 1 and cfg.max_updates >= 1 and cfg.horizon >= 1 and cfg.group_size >= 2
    for name in ("temperature", "lr", "clip", "grad_clip"):
        assert math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0, name
    assert 0 <= cfg.gamma <= 1 and cfg.context_length >= max(16, cfg.horizon + 2)
    assert all(0 < t[0] <= t[1] <= 1 for t in cfg.target_ranges.values())
    assert isinstance(cfg.levels, dict) and cfg.dtype in ("float32", "float64", "bfloat16", "float16")
    assert cfg.policy_d_model % cfg.policy_heads == 0 and 0 <= cfg.seed < 2**63


@fast(300)
@given(st.data())
def test_evaluate_command_line(data):
    from training import evaluate

    flags = cli_flags(evaluate._parser())
    chosen = data.draw(st.lists(st.sampled_from(sorted(flags)), max_size=4, unique=True))
    argv = ["--policy", "runs/x/policy.pt"]
    for flag in chosen:
        extra = st.sampled_from(["0.5,0.7", "0.4/0.5/0.6", "0,13,dense", "policy,fixed", "bigbench:x"])
        argv += [flag] if flags[flag] is None else [flag, data.draw(st.one_of(flags[flag], extra))]
    cfg = parsed_or_refused(evaluate.config_from_args, argv, chosen)
    if cfg is None:
        return
    from training.baselines import target_key

    assert cfg.budgets and all(0 < x <= 1 for b in cfg.budgets for x in target_key(b))
    assert cfg.context_length >= max(16, cfg.horizon + 2) and cfg.horizon >= 1 and cfg.max_rows >= 1
    assert cfg.test_contexts >= 0 and cfg.search_n >= 1 and all(s >= 0 for s in cfg.mc_shots)
