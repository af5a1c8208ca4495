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
  budget     one number for every axis or "attn/mlp/bits16" (default 1.0 = dense)
  method     any name of training.baselines.METHODS (e.g. fixed, random, uniform:13)
  sample     sample the policy at its temperature instead of argmax (default False)
  max_length longest sequence scored at once (default: the compiled max_seq_len; a model given by name
             is compiled with max_seq_len = max_length, default 2048 or the model's positions if fewer)
  max_gen_toks  most tokens generate_until produces when a request does not say (default 256)
  dtype      float32 (default), float64 or bfloat16, for a model given by name
A misspelt or unknown argument is refused (solc.ArgumentError naming it); so is a policy trained for
another base model or action grid.

Protocols (runtime/stepper.py, through training/mc.py and runtime/generate.py, as in the evaluation):
the context minus its last token is prefilled densely; every continuation / generated token is produced by one controlled
decode step whose action the source picks. Requests with the same context share one prefill.
`self.last_budget` holds the realized per-axis budget of the last call (from the actions that ran).
"""
from __future__ import annotations

from typing import Any

import torch

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


def _budget(value) -> tuple[float, float, float]:
    from runtime.validation import check_budget, fail
    from training.baselines import target_key

    valid = "one number in (0, 1] for every axis or three as 'attn/mlp/bits16' (e.g. 0.6 or 0.5/0.8/1.0)"
    if isinstance(value, str):
        try:
            parts = [float(x) for x in value.split("/")]
        except ValueError:
            fail("budget", value, valid)
        value = parts[0] if len(parts) == 1 else parts
    if isinstance(value, (list, tuple)) and len(value) != 3:
        fail("budget", value, valid)
    check_budget(value, 1)
    return target_key(value)


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


@register_model("solc")
class SolcLM(_Base):
    def __init__(self, model: Any = "smollm2-135m", policy: Any = None, budget: Any = 1.0, method: str | None = None,
                 tokenizer: Any = None, sample: bool = False, max_length: int | None = None, max_gen_toks: int = 256,
                 dtype: str = "float32", device: str = "cpu", batch_size: Any = 1, max_batch_size: Any = None, **unused):
        super().__init__()
        import solc
        from runtime.errors import ArgumentError
        from runtime.policy import PolicyNet, check_fits
        from runtime.validation import fail
        from training.baselines import axis_targets

        if unused:  # lm_eval passes only batch_size, max_batch_size and device besides model_args
            raise ArgumentError(sorted(unused)[0], f"unknown SolcLM argument(s) {sorted(unused)}; valid: model, policy, "
                                                   "budget, method, tokenizer, sample, max_length, max_gen_toks, dtype, device")
        if dtype not in DTYPES:
            fail("dtype", dtype, f"one of {list(DTYPES)}")
        sample = _flag("sample", sample)
        if max_length is not None:
            max_length = _count("max_length", max_length, 2)
        max_gen_toks = _count("max_gen_toks", max_gen_toks, 1)
        target = _budget(budget)
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
        self.target = axis_targets(self.sol.space, target)
        self.greedy = not sample
        self.max_length = int(max_length or self.sol.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self._device = self.sol.token_embedding.device
        self.last_budget: dict[str, float] = {}
        self._source()  # fail early on a bad method

    def _source(self):
        from training.baselines import build_source

        return build_source(self.method, target=self.target, policy=self.policy, greedy=self.greedy)

    @property
    def eot_token_id(self) -> int:
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id

    def _record(self, meter: BudgetMeter) -> None:
        self.last_budget = meter.summary()

    # -- lm_eval interface -----------------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from training.mc import encode, score_continuations

        meter = BudgetMeter(self.sol.space)
        encoded = [encode(self.tokenizer, *req.args) for req in requests]
        results: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, (ctx, cont) in enumerate(encoded):
            room = self.max_length - len(cont) + 1  # context tokens that fit (positions: len(ctx) + len(cont) - 1)
            if room < 1:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_length={self.max_length}")
            groups.setdefault(tuple(ctx[-room:]), []).append(i)
        for ctx, idx in groups.items():
            conts = [encoded[i][1] for i in idx]
            # one batch per shared context; a long continuation list is split to bound the cache
            for lo in range(0, len(idx), 64):
                part = idx[lo : lo + 64]
                s = score_continuations(self.sol, list(ctx), conts[lo : lo + 64], [self._source()], [self.target])
                for j, i in enumerate(part):
                    results[i] = (float(s.logprob[j]), bool(s.greedy[j]))
                meter.add(s.actions, s.counted)
        self._record(meter)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each string's log-likelihood given the EOS token, in windows of max_length tokens: every token
        is predicted once, each window with as much preceding context as fits (lm-eval's semantics)."""
        from training.mc import score_continuations

        meter = BudgetMeter(self.sol.space)
        out = []
        for req in requests:
            (text,) = req.args[:1]
            toks = [self.eot_token_id] + self.tokenizer(text, add_special_tokens=False).input_ids
            total, start = 0.0, 1
            while start < len(toks):
                end = min(start + self.max_length, len(toks))
                ctx = toks[max(0, end - self.max_length - 1) : start]  # fed: ctx + window[:-1] = max_length
                s = score_continuations(self.sol, ctx, [toks[start:end]], [self._source()], [self.target])
                total += float(s.logprob[0])
                meter.add(s.actions, s.counted)
                start = end
            out.append(total)
        self._record(meter)
        return out

    def generate_until(self, requests) -> list[str]:
        from runtime.generate import generate

        out = []
        meter = BudgetMeter(self.sol.space)
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tokenizer(context, add_special_tokens=False).input_ids or [self.eot_token_id]
            max_new = max(1, min(max_new, self.sol.max_seq_len - 1))
            ids = ids[-(self.sol.max_seq_len - max_new + 1):]
            g = generate(self.sol, torch.tensor([ids], device=self._device), policy=self._source(), budget=self.target,
                         max_new_tokens=max_new, temperature=temperature, eos_token_id=self.eot_token_id)
            new = g.tokens[0, len(ids):].tolist()
            if self.eot_token_id in new:
                new = new[: new.index(self.eot_token_id)]
            text = self.tokenizer.decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
            meter.add(g.actions, g.controlled)
        self._record(meter)
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
