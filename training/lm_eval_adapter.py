"""lm-evaluation-harness model type "solc": any lm-eval task with a policy (or a baseline) at a budget.

    python -m training.lm_eval_adapter --model solc --model_args model=smollm2-135m,policy=runs/default/policy.pt,budget=0.6 --tasks ...
    (lm_eval's own CLI with the solc model type registered; the plain `lm_eval` command does not import solc)

or from Python, with or without lm_eval installed:

    lm = SolcLM(model="smollm2-135m", policy="runs/default/policy.pt", budget=0.6)
    lm.loglikelihood(requests)            # [(logprob, is_greedy)] per (context, continuation)
    lm.loglikelihood_rolling(requests)    # [logprob] per (string,)
    lm.generate_until(requests)           # [text] per (context, gen_kwargs)

lm_eval is not a runtime dependency of solc (its own dependencies are heavy: scikit-learn, sacrebleu,
rouge-score, evaluate, ...); it comes with the `eval` and `dev` extras (`pip install -e '.[eval]'`;
`make test` installs it, and tests/training/test_lm_eval_adapter.py runs a local YAML task through
lm_eval.simple_evaluate). When it is importable, SolcLM subclasses `lm_eval.api.model.LM` and is
registered as model type "solc"; otherwise it implements the same documented interface on a small
local base class (requests are anything with `.args`, as lm_eval's Instance), so it is usable and
testable offline either way. Arguments (all also accepted as strings, as lm_eval passes them):

  model      a model name or path for solc.load_model, or an already compiled SOLModel (then pass
             tokenizer= too)
  policy     a policy.pt path or a PolicyNet; method defaults to "policy" when given, else "fixed"
  budget     what the method's source is asked to meet (default 1.0 = dense). A policy trained for a
             cost budget (training.grpo's default): one cost fraction in its feasible range, as
             generate(policy=..., budget=0.6) reads it (a triple is refused). A per-axis policy and the
             baselines (Fixed, Random: they read per-axis targets, as in generate): one number for
             every axis or "attn/mlp/bits16"
  method     policy, fixed, random or uniform:<index> (training.baselines.METHODS; random-search needs
             a search on validation contexts, which training.evaluate runs, and is refused here)
  sample     sample the policy's actions at its temperature instead of argmax (default False; only
             with method policy: the baselines have no action distribution). Sampling the generated
             TOKENS is the request's gen_kwargs (do_sample, temperature, top_p, top_k), as in lm_eval
  seed       seed of the random draws (default 0): Random's shuffles, a sampled policy and sampled
             tokens. Every request draws from its own stream, so it scores the same alone or batched
             with others; the k-th copy of an identical generate_until request uses seed + k (lm_eval's
             `repeats` then give different samples)
  max_length longest sequence scored at once (default: the compiled max_seq_len; a model given by name
             is compiled with max_seq_len = max_length, default 2048 or the model's positions if fewer)
  max_gen_toks  most tokens generate_until produces when a request does not say (default 256)
  dtype      float32 (default), float64 or bfloat16, for a model given by name
A misspelt or unknown argument is refused (solc.ArgumentError naming it); so is a policy trained for
another base model or action grid.

Protocols (runtime/stepper.py, through training/mc.py and runtime/generate.py, as in the evaluation):
the context minus its last token is prefilled densely; every continuation / generated token is produced by one controlled
decode step whose action the source picks. As lm_eval's own models do, trailing whitespace of a
loglikelihood context moves to the continuation, and an empty continuation scores (0.0, True).
Requests with the same context and continuation length share one prefill (a source's schedule
depends on the number of steps, so sharing wider would change a request's score with its batch mates).
generate_until reads lm_eval's gen_kwargs: until (a string or a list), max_gen_toks (or its aliases
max_new_tokens, max_tokens, max_completion_tokens, in lm_eval's priority; 0 gives ""), do_sample and
temperature (lm_eval's rule: without do_sample, temperature > 0 samples; do_sample=True without a
temperature samples at 1.0, HF's default), top_p, top_k (0 = off, as HF), seed and num_beams=1; any
other key (or beam search) is refused with a solc.ArgumentError naming it, never ignored. Stop
strings are matched on the decoded text (so one may span tokens); the decode itself runs to EOS or
max_gen_toks.
`self.last_budget` holds the realized budget of the last call (from the actions that ran): per axis and
net_keep, plus `cost` (the realized cost fraction) for a cost-budget policy.
"""
from __future__ import annotations

from typing import Any

import torch

from runtime.actions import AXES
from runtime.costs import BudgetMeter

try:  # pragma: no cover - exercised only where lm_eval is installed
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model

    HAVE_LM_EVAL = True
except ImportError:
    HAVE_LM_EVAL = False

    def _coerce(v: str):
        low = v.lower()
        if low in ("true", "false"):
            return low == "true"
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    class _Base:
        """The parts of lm_eval.api.model.LM that SolcLM relies on, for use without lm_eval."""

        def __init__(self) -> None:
            self._rank, self._world_size, self._device = 0, 1, None

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            args = {}
            for part in filter(None, (p.strip() for p in arg_string.split(","))):
                key, _, value = part.partition("=")
                args[key.strip()] = _coerce(value.strip())
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(**args, **extra)

        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(**arg_dict, **extra)

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

    def register_model(*names):
        return lambda cls: cls


def _budget(value) -> float | tuple[float, float, float]:
    """One number or an (attn, mlp, bits/16) triple (also as a dict over axes), each in (0, 1]."""
    from runtime.validation import check_budget, fail

    valid = "one number in (0, 1] for every axis or three as 'attn/mlp/bits16' (e.g. 0.6 or 0.5/0.8/1.0)"
    if isinstance(value, str):
        try:
            parts = [float(x) for x in value.split("/")]
        except ValueError:
            fail("budget", value, valid)
        value = parts[0] if len(parts) == 1 else parts
    if isinstance(value, dict):  # {axis: keep}, as generate takes it: an axis left out runs dense
        check_budget(value, 1)
        return tuple(float(value.get(axis, 1.0)) for axis in AXES)
    if not isinstance(value, (list, tuple)):
        check_budget(value, 1)
        return float(value)
    if len(value) != 3:
        fail("budget", value, valid)
    check_budget(value, 1)
    return tuple(float(x) for x in value)


def _flag(argument: str, value) -> bool:
    """A bool, or 'true' / 'false' as an arg string carries it."""
    from runtime.validation import fail

    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        fail(argument, value, "True or False", type_error=True)
    return value


def _count(argument: str, value, lo: int, hi: int | None = None, why: str = "") -> int:
    """An int (also as a string) in lo..hi."""
    from runtime.validation import check_int

    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    return check_int(argument, value, lo, hi, why)


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # lm_eval's priority
GEN_KWARGS = ("until", *MAX_TOKEN_KEYS, "do_sample", "temperature", "top_p", "top_k", "seed", "num_beams")


class _Spent:
    """The realized budget of one call pooled over its requests: per axis (BudgetMeter) and, under a
    cost budget spec, the realized cost fraction (every step priced at the keys it attended)."""

    def __init__(self, space, spec):
        self.meter, self.space, self.spec, self.steps = BudgetMeter(space), space, spec, []

    def add(self, actions, controlled, kv_lens) -> None:
        self.meter.add(actions, controlled)
        if self.spec.is_cost:
            self.steps.append(tuple(t.reshape(1, -1).cpu() for t in (actions, controlled, kv_lens)))

    def summary(self) -> dict:
        out = self.meter.summary()
        if self.spec.is_cost:
            cost = float("nan")
            if self.steps:
                actions, controlled, kv_lens = (torch.cat(t, 1) for t in zip(*self.steps))
                cost = float(self.spec.realized(self.space, actions, controlled, kv_lens, float("nan"))[0, 0])
            out.update(cost=cost, cost_model=self.spec.cost_model["kind"])
        return out


@register_model("solc")
class SolcLM(_Base):
    def __init__(self, model: Any = "smollm2-135m", policy: Any = None, budget: Any = 1.0, method: str | None = None,
                 tokenizer: Any = None, sample: bool = False, max_length: int | None = None, max_gen_toks: int = 256,
                 dtype: str = "float32", device: str = "cpu", seed: int = 0, batch_size: Any = 1, max_batch_size: Any = None,
                 **unused):
        super().__init__()
        import solc
        from runtime.budget import BudgetSpec
        from runtime.errors import ArgumentError
        from runtime.policy import PolicyNet, check_fits
        from runtime.validation import MAX_SEED, fail
        from training.baselines import METHODS, axis_targets

        if unused:  # lm_eval passes only batch_size, max_batch_size and device besides model_args
            raise ArgumentError(sorted(unused)[0], f"unknown SolcLM argument(s) {sorted(unused)}; valid: model, policy, "
                                                   "budget, method, tokenizer, sample, seed, max_length, max_gen_toks, dtype, "
                                                   "device")
        if dtype not in DTYPES:
            fail("dtype", dtype, f"one of {list(DTYPES)}")
        if method is not None and not isinstance(method, str):
            fail("method", method, f"one of {list(METHODS)}", type_error=True)
        if method == "random-search":
            raise ArgumentError("method", "method='random-search' runs a schedule searched on validation contexts "
                                          "(training.evaluate searches one); the adapter has none: use policy, fixed, "
                                          "random or uniform:<index>")
        sample = _flag("sample", sample)
        if sample and (method or ("policy" if policy is not None and not (isinstance(policy, str) and not policy)
                                  else "fixed")) != "policy":
            raise ArgumentError("sample", f"sample=True samples a policy's actions, but method "
                                          f"{method or 'fixed'!r} has no policy (its actions are not drawn from a "
                                          "distribution); to sample the generated tokens, set do_sample/temperature "
                                          "in the request's gen_kwargs")
        seed = _count("seed", seed, 0, MAX_SEED - 1)
        if max_length is not None:
            max_length = _count("max_length", max_length, 2)
        max_gen_toks = _count("max_gen_toks", max_gen_toks, 1)
        budget = _budget(budget)
        if policy is not None and not isinstance(policy, (str, PolicyNet)):
            fail("policy", policy, "None, a policy.pt path or a runtime.policy.PolicyNet", type_error=True)

        if device in (None, "auto") or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm_eval's CLI passes device="cuda" unless told otherwise, also on machines without CUDA
            if device not in (None, "auto"):
                import warnings

                warnings.warn(f"device={device!r} but CUDA is not available: running on the CPU", stacklevel=2)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(policy, str) and policy:
            policy = PolicyNet.load(policy)
        self.policy = policy or None
        if isinstance(model, str):
            dt = DTYPES[dtype]
            base = solc.load_model(model, dtype=dt).to(device)
            kwargs = {}
            if self.policy is not None:
                kwargs = {"actions": list(self.policy.space.axes), "levels": {a: list(v) for a, v in self.policy.space.levels.items()},
                          "quant": self.policy.space.quant}
            from runtime.hf_adapter import max_positions

            # default 2048 positions, or the model's own if it has fewer (a tiny model's 1024)
            self.sol = solc.compile(base, max_seq_len=max_length or min(2048, max_positions(base)), **kwargs)
            self.tokenizer = tokenizer or solc.load_tokenizer(model)
        else:
            if tokenizer is None:
                raise ValueError("pass tokenizer= with a compiled SOLModel")
            self.sol, self.tokenizer = model, tokenizer
        if self.policy is not None:
            check_fits(self.policy, int(self.sol.token_embedding.shape[1]), self.sol.space)
            self.policy = self.policy.to(self.sol.token_embedding.device).eval()
        if max_length is not None and max_length > self.sol.max_seq_len:
            fail("max_length", max_length, f"an int in 2..{self.sol.max_seq_len} (the compiled max_seq_len)")
        self.method = method or ("policy" if self.policy is not None else "fixed")
        self.greedy = not sample
        self.seed = seed
        try:
            self._source()  # fail early on a bad method
        except ArgumentError:
            raise
        except ValueError as e:
            raise ArgumentError("method", f"method={self.method!r}: {e}") from None
        if self.method.startswith("uniform:") and not int(self.method.split(":", 1)[1]) < len(self.sol.space):
            fail("method", self.method, f"uniform:<index> with an index in 0..{len(self.sol.space) - 1} (this action space)")
        # what the budget means: a policy's own spec (cost or per-axis); the baselines read per-axis targets
        self.budget_spec = self.policy.config.budget_spec if self.method == "policy" else BudgetSpec.per_axis()
        if self.budget_spec.is_cost:
            if isinstance(budget, tuple):
                fail("budget", "/".join(f"{x:g}" for x in budget), "one number: the policy was trained for a cost "
                     "budget (the fraction of the dense decode cost), not per-axis targets")
            self.budget_spec.targets(budget, 1, self.sol.space)  # CostBudgetError naming the feasible range
            self.target: Any = float(budget)  # the cost fraction, as generate and score_continuations take it
        else:
            self.target = axis_targets(self.sol.space, budget)
        self.max_length = int(max_length or self.sol.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self._device = self.sol.token_embedding.device
        self.last_budget: dict[str, float] = {}

    def _source(self):
        from training.baselines import build_source

        return build_source(self.method, policy=self.policy, greedy=self.greedy)

    @property
    def eot_token_id(self) -> int:
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id

    def _generator(self, rows: int):
        """The draws of `rows` rows scored together, each as if alone: a policy draws per row (one stream
        each), the other sources run one schedule for every row of a shared context (SharedRows)."""
        if self.method == "policy":
            return [torch.Generator().manual_seed(self.seed) for _ in range(rows)]
        return torch.Generator().manual_seed(self.seed)

    def _stop_ids(self) -> list[int]:
        """The tokenizer's end of text first (a stopped row's fill), then every other EOS id of the model's
        generation config (an instruct model ends a turn with one of several), as HF's generate stops."""
        return [self.eot_token_id] + [e for e in self.sol.eos_token_ids if e != self.eot_token_id]

    def _record(self, spent: _Spent) -> None:
        self.last_budget = spent.summary()

    # -- lm_eval interface -----------------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from training.mc import _move_space, encode, score_continuations

        spent = _Spent(self.sol.space, self.budget_spec)
        results: list = [None] * len(requests)
        encoded: dict[int, tuple[list[int], list[int]]] = {}
        for i, req in enumerate(requests):
            context, continuation = req.args[0], req.args[1]
            if context:  # lm_eval's _encode_pair: the context's trailing whitespace starts the continuation
                context, (continuation,) = _move_space(context, [continuation])
            if not continuation:
                results[i] = (0.0, True)  # the log-probability of nothing, as lm_eval's HF model gives it
                continue
            encoded[i] = encode(self.tokenizer, context, continuation)
        groups: dict[tuple, list[int]] = {}
        for i, (ctx, cont) in encoded.items():
            room = self.max_length - len(cont) + 1  # context tokens that fit (positions: len(ctx) + len(cont) - 1)
            if room < 1:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_length={self.max_length}")
            groups.setdefault((tuple(ctx[-room:]), len(cont)), []).append(i)
        for (ctx, _), idx in groups.items():
            conts = [encoded[i][1] for i in idx]
            # one batch per shared context and length; a long continuation list is split to bound the cache
            for lo in range(0, len(idx), 64):
                part = idx[lo : lo + 64]
                s = score_continuations(self.sol, list(ctx), conts[lo : lo + 64], [self._source()], [self.target],
                                        generator=self._generator(len(part)))
                for j, i in enumerate(part):
                    results[i] = (float(s.logprob[j]), bool(s.greedy[j]))
                spent.add(s.actions, s.counted, s.kv_lens)
        self._record(spent)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each string's log-likelihood given the EOS token, in windows of max_length tokens: every token
        is predicted once, each window with as much preceding context as fits (lm-eval's semantics)."""
        from training.mc import score_continuations

        spent = _Spent(self.sol.space, self.budget_spec)
        out = []
        for req in requests:
            (text,) = req.args[:1]
            toks = [self.eot_token_id] + self.tokenizer(text, add_special_tokens=False).input_ids
            total, start = 0.0, 1
            while start < len(toks):
                end = min(start + self.max_length, len(toks))
                ctx = toks[max(0, end - self.max_length - 1) : start]  # fed: ctx + window[:-1] = max_length
                s = score_continuations(self.sol, ctx, [toks[start:end]], [self._source()], [self.target],
                                        generator=self._generator(1))
                total += float(s.logprob[0])
                spent.add(s.actions, s.counted, s.kv_lens)
                start = end
            out.append(total)
        self._record(spent)
        return out

    def _gen_kwargs(self, gen_kwargs) -> tuple[list[str], int, float, int | None, float | None, int]:
        """(until, max new tokens, temperature, top_k, top_p, seed) of one request's gen_kwargs, with
        lm_eval's meaning (normalize_gen_kwargs); what generate cannot honour is refused, naming the key."""
        from runtime.errors import ArgumentError
        from runtime.validation import MAX_SEED, check_int, check_real, check_sampling, fail

        kw = {} if gen_kwargs is None else gen_kwargs
        if not isinstance(kw, dict):
            fail("gen_kwargs", kw, "a dict of generation kwargs (until, max_gen_toks, do_sample, ...)", type_error=True)
        unknown = [k for k in kw if k not in GEN_KWARGS]
        if unknown:
            hint = " (prompt + generation, HF's meaning: use max_gen_toks)" if unknown[0] == "max_length" else ""
            raise ArgumentError(unknown[0], f"gen_kwargs {unknown[0]}={kw[unknown[0]]!r} is not supported{hint}: "
                                            f"solc's generate_until takes {', '.join(GEN_KWARGS)}")
        if kw.get("num_beams", 1) != 1 or isinstance(kw.get("num_beams"), bool):
            fail("num_beams", kw["num_beams"], "1 (solc decodes one sequence per request: no beam search)")
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else until
        if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            fail("until", kw.get("until"), "a stop string or a list of stop strings", type_error=True)
        key = next((k for k in MAX_TOKEN_KEYS if kw.get(k) is not None), None)
        max_new = self.max_gen_toks if key is None else _count(key, kw[key], 0)
        temperature = kw.get("temperature")
        if temperature is not None:
            temperature = check_real("temperature", temperature, 0.0)
        do_sample = None if kw.get("do_sample") is None else _flag("do_sample", kw["do_sample"])
        if do_sample is None:  # lm_eval: a temperature above 0 samples
            do_sample = bool(temperature)
        if not do_sample:
            temperature = 0.0
        elif temperature is None:
            temperature = 1.0  # HF's default when do_sample=True names none
        elif temperature == 0:
            fail("temperature", 0.0, "> 0 with do_sample=True (temperature 0 is greedy decoding: set do_sample=False)")
        top_k = kw.get("top_k")
        top_k = None if top_k == 0 and not isinstance(top_k, bool) else top_k  # HF: top_k=0 filters nothing
        top_p = kw.get("top_p")
        check_sampling(temperature, top_k, top_p)
        seed = self.seed if kw.get("seed") is None else check_int("seed", kw["seed"], 0, MAX_SEED - 1)
        return list(until), max_new, temperature, top_k, top_p, seed

    def generate_until(self, requests) -> list[str]:
        from runtime.generate import generate
        from runtime.validation import MAX_SEED

        calls = []  # every request's gen_kwargs are checked before anything runs
        copies: dict[tuple, int] = {}
        for req in requests:
            context, kwargs = req.args[0], req.args[1] if len(req.args) > 1 else {}
            same = (context, repr(kwargs))
            k = copies[same] = copies.get(same, -1) + 1  # the k-th identical request: its own draws
            calls.append((context, self._gen_kwargs(kwargs), k))
        out = []
        spent = _Spent(self.sol.space, self.budget_spec)
        stop_ids = self._stop_ids()
        for context, (until, max_new, temperature, top_k, top_p, seed), k in calls:
            if max_new == 0:
                out.append("")
                continue
            ids = self.tokenizer(context, add_special_tokens=False).input_ids or [self.eot_token_id]
            max_new = min(max_new, self.max_length - 1)
            ids = ids[-(self.max_length - max_new + 1):]
            g = generate(self.sol, torch.tensor([ids], device=self._device), policy=self._source(), budget=self.target,
                         max_new_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=(seed + k) % MAX_SEED, eos_token_id=stop_ids,
                         stop_strings=[u for u in until if u] or None, tokenizer=self.tokenizer)  # no step past a stop
            new = g.tokens[0, len(ids):].tolist()
            stop_at = [i for i, t in enumerate(new) if t in stop_ids]
            new = new[: stop_at[0]] if stop_at else new
            text = self.tokenizer.decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
            kv_lens = len(ids) + torch.arange(g.actions.shape[1])[None]  # step t attends the prompt and t tokens
            spent.add(g.actions, g.controlled, kv_lens)
        self._record(spent)
        return out


def main(argv=None) -> int:
    """`python -m training.lm_eval_adapter <lm_eval arguments>`: lm_eval's own command line with the
    `solc` model type registered (the plain `lm_eval` command does not import solc)."""
    import sys

    if not HAVE_LM_EVAL:
        raise SystemExit("lm_eval is not installed: pip install -e '.[eval]' (lm_eval==0.4.13)")
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
