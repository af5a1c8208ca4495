"""The lm-eval adapter's three request types, on hand-made requests and a tiny model (offline, no lm_eval)."""
from types import SimpleNamespace

import pytest
import torch

from runtime.generate import generate, score
from runtime.policy import PolicyConfig, PolicyNet
from runtime.schedulers import Fixed
from training.lm_eval_adapter import HAVE_LM_EVAL, SolcLM


class ByteTok:
    eos_token_id, bos_token_id = 0, None

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=list(text.encode()))

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


def req(*args):
    return SimpleNamespace(args=args)  # what the adapter reads of lm_eval's Instance


def _dense_loglik(sol, ids, start):
    """Sum of log p(ids[i]) for i >= start from one dense teacher-forced forward."""
    x = torch.tensor([ids])
    logp = torch.log_softmax(sol(x).logits[0].double(), -1)
    return sum(float(logp[i - 1, ids[i]]) for i in range(start, len(ids)))


CTX = "The cat sat on the"


def test_loglikelihood_dense_matches_a_plain_forward(tiny_sol):
    lm = SolcLM(model=tiny_sol, tokenizer=ByteTok(), budget=1.0)
    out = lm.loglikelihood([req(CTX, " mat"), req(CTX, " hat!"), req("Other context here", " x")])
    for (ctx, cont), (lp, _) in zip([(CTX, " mat"), (CTX, " hat!"), ("Other context here", " x")], out):
        ids = list((ctx + cont).encode())
        assert lp == pytest.approx(_dense_loglik(tiny_sol, ids, len(ctx)), abs=2e-4)
    assert lm.last_budget["net_keep"] == pytest.approx(1.0)


class CharTok(ByteTok):
    """ASCII characters are their byte; any other token id t is the character U+E000 + t (invertible)."""

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[ord(c) if ord(c) < 128 else ord(c) - 0xE000 for c in text])

    @staticmethod
    def text(ids):
        return "".join(chr(t) if t < 128 else chr(0xE000 + t) for t in ids)


def test_loglikelihood_under_fixed_matches_runtime_score_and_greedy_flag(tiny_sol):
    lm = SolcLM(model=tiny_sol, tokenizer=CharTok(), budget=0.5, method="fixed")
    (lp, greedy), = lm.loglikelihood([req(CTX, " mat")])
    tokens = torch.tensor([list((CTX + " mat").encode())])
    ref = score(tiny_sol, tokens, len(CTX), policy=Fixed(), budget=0.5)
    assert lp == pytest.approx(float(ref.logprobs.double().sum()), abs=1e-4)
    assert lm.last_budget["attn"] < 1.0 and lm.last_budget["mlp"] < 1.0
    # is_greedy: a continuation made of the argmax tokens is greedy; change its last token and it is not
    g = generate(tiny_sol, torch.tensor([list(CTX.encode())]), policy=Fixed(), budget=0.5, max_new_tokens=4)
    new = g.tokens[0, len(CTX):].tolist()
    assert lm.loglikelihood([req(CTX, CharTok.text(new))])[0][1] is True
    wrong = new[:-1] + [(new[-1] + 1) % tiny_sol.token_embedding.shape[0]]
    assert lm.loglikelihood([req(CTX, CharTok.text(wrong))])[0][1] is False
    assert greedy is (new == list(b" mat"))  # " mat" is greedy only if it is what greedy decoding gives


def test_loglikelihood_rolling_windows(tiny_sol):
    text = "abcdefghijklmnopqrstuvwx"
    ids = [0] + list(text.encode())
    full = SolcLM(model=tiny_sol, tokenizer=ByteTok(), budget=1.0)
    assert full.loglikelihood_rolling([req(text)])[0] == pytest.approx(_dense_loglik(tiny_sol, ids, 1), abs=2e-4)
    short = SolcLM(model=tiny_sol, tokenizer=ByteTok(), budget=1.0, max_length=10)
    got = short.loglikelihood_rolling([req(text)])[0]
    # at most 10 positions fed per window: tokens 1..10 from [0..9], 11..20 from [10..19], then 21..24
    # with as much context as fits ([14..23])
    want, start = 0.0, 1
    while start < len(ids):
        end = min(start + 10, len(ids))
        lo = max(0, end - 11)
        want += _dense_loglik(tiny_sol, ids[lo:end], start - lo)
        start = end
    assert got == pytest.approx(want, abs=5e-4)


def test_generate_until_and_arg_string(tiny_sol):
    lm = SolcLM.create_from_arg_string("budget=0.6,method=fixed,max_gen_toks=6", {"model": tiny_sol, "tokenizer": ByteTok(), "batch_size": 1})
    assert lm.target == (0.6, 0.6, 0.6) and lm.max_gen_toks == 6
    ids = torch.tensor([list(CTX.encode())])
    g = generate(tiny_sol, ids, policy=Fixed(), budget=0.6, max_new_tokens=6, eos_token_id=0)
    new = g.tokens[0, ids.shape[1]:].tolist()
    new = new[: new.index(0)] if 0 in new else new
    text = bytes(new).decode(errors="replace")
    out = lm.generate_until([req(CTX, {"until": ["\x00never"]}), req(CTX, {"until": [text[2:4]] if len(text) >= 4 else [], "max_gen_toks": 6})])
    assert out[0] == text
    assert out[1] == (text[: text.index(text[2:4])] if len(text) >= 4 else text)
    assert 0.5 < lm.last_budget["net_keep"] < 0.7


def test_policy_method(tiny_sol, tmp_path):
    torch.manual_seed(0)
    policy = PolicyNet(PolicyConfig.for_model(tiny_sol, d_model=32, n_heads=2))
    policy.save(tmp_path / "p.pt")
    lm = SolcLM.create_from_arg_string(f"policy={tmp_path / 'p.pt'},budget=0.5/0.8/0.5", {"model": tiny_sol, "tokenizer": ByteTok()})
    assert lm.method == "policy" and lm.target == (0.5, 0.8, 0.5)
    out = lm.loglikelihood([req(CTX, " mat and the dog")])
    assert out[0][0] < 0 and set(lm.last_budget) == {"attn", "mlp", "quant", "net_keep"}
    assert abs(lm.last_budget["mlp"] - 0.8) <= 0.1  # the untrained policy is a budget controller
    with pytest.raises(ValueError, match="valid choices"):
        SolcLM(model=tiny_sol, tokenizer=ByteTok(), method="nope")


@pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm_eval is not installed (the adapter is tested on its interface above)")
def test_registered_with_lm_eval():  # pragma: no cover
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    assert get_model("solc") is SolcLM and issubclass(SolcLM, LM)


TOY_TASK = """task: solc_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _toy_task(docs, tmp_path, monkeypatch):
    """Write `docs` as a local lm_eval multiple-choice task (read offline); returns its include path."""
    import json

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy.yaml").write_text(TOY_TASK.format(data=data))
    return str(tmp_path / "tasks")


def _choice_logliks(lm, doc):
    """The adapter's log-likelihood of each choice, as lm_eval asks it: (question, " " + choice)."""
    return [lp for lp, _ in lm.loglikelihood([req(doc["question"], " " + c) for c in doc["choices"]])]


def _accuracy(lm, docs):
    hits = 0
    for d in docs:
        lls = _choice_logliks(lm, d)
        hits += max(range(len(lls)), key=lambda i: lls[i]) == d["answer"]
    return hits / len(docs)


def test_lm_eval_runs_a_local_task_with_model_type_solc(tiny_sol, tmp_path, monkeypatch):
    """lm_eval itself (simple_evaluate + a local YAML task on a local JSONL file, offline) drives the
    adapter; its accuracy is the argmax of the adapter's own log-likelihoods on every question."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    docs = [
        {"question": "The cat sat on the", "choices": ["mat", "hat", "zzz"], "answer": 0},
        {"question": "One, two, three,", "choices": ["four", "qq"], "answer": 1},
        {"question": "Roses are", "choices": ["red", "blue", "xx"], "answer": 2},
    ]
    include = _toy_task(docs, tmp_path, monkeypatch)
    assert get_model("solc") is SolcLM  # registered as lm_eval model type "solc"
    lm = SolcLM(model=tiny_sol, tokenizer=ByteTok(), budget=0.6, method="fixed")
    out = lm_eval.simple_evaluate(model=lm, tasks=["solc_toy_mc"], bootstrap_iters=0, random_seed=0,
                                  task_manager=TaskManager(include_path=include, include_defaults=False))
    assert lm.last_budget["attn"] < 1.0  # the Fixed source ran at the requested budget, not dense
    samples = sorted(out["samples"]["solc_toy_mc"], key=lambda x: x["doc_id"])
    assert len(samples) == len(docs)
    ref = SolcLM(model=tiny_sol, tokenizer=ByteTok(), budget=0.6, method="fixed")
    for d, sample in zip(docs, samples):
        assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(_choice_logliks(ref, d), abs=1e-6)
    assert out["results"]["solc_toy_mc"]["acc,none"] == pytest.approx(_accuracy(ref, docs))


def test_lm_eval_command_line_with_the_builtin_model(tmp_path, monkeypatch):
    """`python -m training.lm_eval_adapter` is lm_eval's CLI with model type solc; it writes lm_eval's
    results JSON, whose accuracy is the argmax of the adapter's log-likelihoods."""
    pytest.importorskip("lm_eval")
    import json

    from training.lm_eval_adapter import main

    docs = [{"question": "The cat sat on the", "choices": ["mat", "qqq"], "answer": 0},
            {"question": "One, two, three,", "choices": ["zzz", "four"], "answer": 1}]
    include = _toy_task(docs, tmp_path, monkeypatch)
    args = "model=smollm2-135m,budget=0.6,method=fixed,max_length=128"
    main(["--model", "solc", "--model_args", args, "--device", "cpu", "--tasks", "solc_toy_mc",
          "--include_path", include, "--output_path", str(tmp_path / "out")])
    results = sorted((tmp_path / "out").rglob("results_*.json"))
    assert len(results) == 1
    acc = json.loads(results[0].read_text())["results"]["solc_toy_mc"]["acc,none"]
    assert acc == pytest.approx(_accuracy(SolcLM.create_from_arg_string(args), docs))


@pytest.mark.parametrize("kwargs, argument, text", [
    (dict(polcy="p.pt"), "polcy", "unknown SolcLM argument"),
    (dict(sample="yes"), "sample", "True or False"),
    (dict(budget=2.0), "budget", "<= 1.0"),
    (dict(budget="0.5/0.5"), "budget", "attn/mlp/bits16"),
    (dict(budget="abc"), "budget", "attn/mlp/bits16"),
    (dict(max_length=0), "max_length", ">= 2"),
    (dict(max_length=10**6), "max_length", "compiled max_seq_len"),
    (dict(max_gen_toks=0), "max_gen_toks", ">= 1"),
    (dict(dtype="float16"), "dtype", "float32"),
])
def test_arguments_are_checked_and_named(tiny_sol, kwargs, argument, text):
    import solc

    with pytest.raises(solc.ArgumentError, match=text) as info:
        SolcLM(model=tiny_sol, tokenizer=ByteTok(), **kwargs)
    assert info.value.argument == argument
    assert SolcLM(model=tiny_sol, tokenizer=ByteTok(), sample="false", max_length="32").greedy is True


def test_a_policy_of_another_model_or_grid_is_refused(tiny_sol):
    import solc

    cfg = PolicyConfig.for_model(tiny_sol, d_model=32, n_heads=2)
    wide = PolicyNet(PolicyConfig(d_base=cfg.d_base * 2, space=cfg.space, d_model=32, n_heads=2))
    with pytest.raises(solc.ArgumentError, match=f"hidden size {cfg.d_base * 2}, not {cfg.d_base}") as info:
        SolcLM(model=tiny_sol, tokenizer=ByteTok(), policy=wide)
    assert info.value.argument == "policy"
    from runtime.actions import ActionSpace

    other = PolicyNet(PolicyConfig(d_base=cfg.d_base, space=ActionSpace(["mlp"]).to_dict(), d_model=32, n_heads=2))
    with pytest.raises(solc.ArgumentError, match="trained for") as info:
        SolcLM(model=tiny_sol, tokenizer=ByteTok(), policy=other)
    assert info.value.argument == "policy"


def test_a_model_by_name_with_fewer_positions_than_2048_compiles(tmp_path):
    lm = SolcLM(model="tiny-llama", tokenizer=ByteTok())  # 1024 positions: compiled at 1024, not refused
    assert lm.max_length == lm.sol.max_seq_len == 1024


# -- audit: sampling, gen_kwargs, shared prefills, cost budgets -------------------------------------
def _generated(sol, context, n, **kw):
    """What runtime.generate gives for `context` (ByteTok ids), cut at EOS 0, as text."""
    ids = torch.tensor([list(context.encode())])
    kw.setdefault("policy", Fixed())
    kw.setdefault("budget", 0.6)
    new = generate(sol, ids, max_new_tokens=n, eos_token_id=0, **kw).tokens[0, ids.shape[1]:].tolist()
    return bytes(new[: new.index(0)] if 0 in new else new).decode(errors="replace")


def test_sample_is_refused_without_a_policy_and_samples_the_policy_reproducibly(tiny_sol):
    import solc

    for kwargs in (dict(method="fixed"), dict(), dict(method="uniform:3"), dict(sample="true", method="random")):
        with pytest.raises(solc.ArgumentError, match="samples a policy's actions") as info:
            SolcLM(model=tiny_sol, tokenizer=ByteTok(), **{"sample": True, **kwargs})
        assert info.value.argument == "sample"
    torch.manual_seed(0)
    policy = PolicyNet(PolicyConfig.for_model(tiny_sol, d_model=32, n_heads=2))
    sampled = SolcLM(model=tiny_sol, tokenizer=ByteTok(), policy=policy, budget=0.5, sample=True)
    greedy = SolcLM(model=tiny_sol, tokenizer=ByteTok(), policy=policy, budget=0.5)
    r = [req(CTX, " mat and the dog ran")]
    first = sampled.loglikelihood(r)
    assert sampled.loglikelihood(r) == first  # seeded: the same draws every call
    assert first != greedy.loglikelihood(r)


def test_generate_until_honours_sampling_gen_kwargs(tiny_sol):
    lm = SolcLM(model=tiny_sol, tokenizer=ByteTok(), budget=0.6, method="fixed")
    greedy = _generated(tiny_sol, CTX, 8)
    hot = _generated(tiny_sol, CTX, 8, temperature=5.0, seed=0)
    assert hot != greedy  # at temperature 5 the draws leave the argmax
    out = lm.generate_until([
        req(CTX, {"do_sample": True, "temperature": 5.0, "max_gen_toks": 8}),
        req(CTX, {"do_sample": True, "temperature": 5.0, "top_p": 1e-6, "max_gen_toks": 8}),  # only the argmax is left
        req(CTX, {"do_sample": True, "temperature": 5.0, "top_k": 1, "max_gen_toks": 8}),
        req(CTX, {"temperature": 5.0, "max_new_tokens": 8}),  # lm_eval: without do_sample, temperature > 0 samples
        req(CTX, {"do_sample": False, "temperature": 5.0, "max_gen_toks": 8}),  # do_sample=False: greedy
        req(CTX, {"do_sample": True, "temperature": 5.0, "top_p": 0.9, "top_k": 20, "max_gen_toks": 8, "seed": 7}),
    ])
    assert out[0] == hot and out[1] == greedy and out[2] == greedy and out[3] == hot and out[4] == greedy
    assert out[5] == _generated(tiny_sol, CTX, 8, temperature=5.0, top_p=0.9, top_k=20, seed=7)
    # aliases of max_gen_toks, in lm_eval's priority; 0 generates nothing
    out = lm.generate_until([req(CTX, {"max_new_tokens": 3}), req(CTX, {"max_gen_toks": 2, "max_new_tokens": 5}),
                             req(CTX, {"max_gen_toks": 0}), req(CTX, {"until": "\x00x", "max_tokens": 4})])
    assert out == [_generated(tiny_sol, CTX, 3), _generated(tiny_sol, CTX, 2), "", _generated(tiny_sol, CTX, 4)]
    # a stop string given as a string (not a list), spanning two tokens, and the earliest of several stops
    whole = _generated(tiny_sol, CTX, 8)
    assert len(whole) >= 4
    assert lm.generate_until([req(CTX, {"until": whole[2:4], "max_gen_toks": 8}),
                              req(CTX, {"until": ["\x00never", whole[3:5], whole[1:3]], "max_gen_toks": 8})]) == \
        [whole[: whole.index(whole[2:4])], whole[: whole.index(whole[1:3])]]


def test_generate_until_runs_no_step_past_a_stop_string(tiny_sol, monkeypatch):
    """The stop strings go to generate: decoding ends at the token that completes one (the budget counts
    the steps that ran), not at max_gen_toks with the text cut afterwards."""
    import runtime.generate

    ids = list(CTX.encode())
    new = generate(tiny_sol, torch.tensor([ids]), policy=Fixed(), budget=0.6, max_new_tokens=12,
                   eos_token_id=[]).tokens[0, len(ids):].tolist()
    if 0 in new[:6]:
        pytest.skip("the model emits EOS early here")
    stop = ByteTok().decode(new[3:5])
    ran = next(n for n in range(1, 13) if stop in ByteTok().decode(new[:n]))
    outputs, real = [], runtime.generate.generate
    monkeypatch.setattr(runtime.generate, "generate", lambda *a, **k: outputs.append(real(*a, **k)) or outputs[-1])
    lm = SolcLM(model=tiny_sol, tokenizer=ByteTok(), budget=0.6, method="fixed")
    text = lm.generate_until([req(CTX, {"until": [stop], "max_gen_toks": 12})])[0]
    assert text == ByteTok().decode(new[:ran])[: ByteTok().decode(new[:ran]).index(stop)]
    assert int((outputs[0].actions[0] >= 0).sum()) == ran < 12


def test_generate_until_stops_at_every_eos_id_of_the_model(tiny_sol, monkeypatch):
    """An instruct model ends a turn with one of several EOS ids (its generation config): the adapter
    stops at each, as HF's generate does, not only at the tokenizer's end of text."""
    ids = list(CTX.encode())
    new = generate(tiny_sol, torch.tensor([ids]), policy=Fixed(), budget=0.6, max_new_tokens=8,
                   eos_token_id=[]).tokens[0, len(ids):].tolist()
    at = next((i for i in range(1, 8) if new[i] not in new[:i] and 0 not in new[:i + 1]), None)
    if at is None:
        pytest.skip("no token of the greedy text is new after the first")
    monkeypatch.setattr(type(tiny_sol), "eos_token_ids", property(lambda self: [new[at]]))
    lm = SolcLM(model=tiny_sol, tokenizer=ByteTok(), budget=0.6, method="fixed")
    assert lm.generate_until([req(CTX, {"max_gen_toks": 8})]) == [ByteTok().decode(new[:at])]


def test_repeated_sampled_requests_draw_differently_and_reproducibly(tiny_sol):
    """lm_eval's `repeats` send the same request k times: copy k draws with seed + k, so they differ,
    and a rerun gives the same texts."""
    lm = SolcLM(model=tiny_sol, tokenizer=ByteTok(), budget=0.6, method="fixed", seed=3)
    kw = {"do_sample": True, "temperature": 3.0, "max_gen_toks": 8}
    out = lm.generate_until([req(CTX, kw), req("Other", kw), req(CTX, kw)])
    assert out[0] == _generated(tiny_sol, CTX, 8, temperature=3.0, seed=3)
    assert out[1] == _generated(tiny_sol, "Other", 8, temperature=3.0, seed=3)
    assert out[2] == _generated(tiny_sol, CTX, 8, temperature=3.0, seed=4) != out[0]
    assert lm.generate_until([req(CTX, kw), req("Other", kw), req(CTX, kw)]) == out


@pytest.mark.parametrize("kwargs, argument, text", [
    ({"num_beams": 4}, "num_beams", "no beam search"),
    ({"max_length": 20}, "max_length", "use max_gen_toks"),
    ({"repetition_penalty": 1.2}, "repetition_penalty", "not supported"),
    ({"do_sample": True, "top_p": 0.0}, "top_p", "> 0.0"),
    ({"do_sample": True, "top_k": -2}, "top_k", ">= 1"),
    ({"do_sample": True, "temperature": 0.0}, "temperature", "do_sample=True"),
    ({"do_sample": "maybe"}, "do_sample", "True or False"),
    ({"temperature": -1.0}, "temperature", ">= 0.0"),
    ({"until": 5}, "until", "stop string"),
    ({"until": ["ok", None]}, "until", "stop string"),
    ({"max_gen_toks": -1}, "max_gen_toks", ">= 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens", "an int"),
])
def test_gen_kwargs_it_cannot_honour_are_refused_before_anything_runs(tiny_sol, monkeypatch, kwargs, argument, text):
    import runtime.generate
    import solc

    calls = []
    real = runtime.generate.generate
    monkeypatch.setattr(runtime.generate, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    lm = SolcLM(model=tiny_sol, tokenizer=ByteTok())
    with pytest.raises(solc.ArgumentError, match=text) as info:
        lm.generate_until([req(CTX, {"max_gen_toks": 2}), req(CTX, kwargs)])
    assert info.value.argument == argument and calls == []


def test_generate_until_keeps_to_max_length(tiny_sol):
    text = "abcdefghijklmnopqrstuvwxyz0123456789"
    lm = SolcLM(model=tiny_sol, tokenizer=ByteTok(), budget=1.0, max_length=16)
    # 4 new tokens in 16 positions: the last 13 context tokens
    assert lm.generate_until([req(text, {"max_gen_toks": 4})]) == [_generated(tiny_sol, text[-13:], 4, budget=1.0)]


@pytest.mark.parametrize("method", ["fixed", "random", "policy", "policy-sampled"])
def test_requests_sharing_a_context_score_as_they_do_one_by_one(tiny_sol, method):
    """Requests with one context share a prefill; a request's score must not depend on what else is
    sent with it (its continuation's length set the schedule of the whole batch), nor vary between calls."""
    kwargs = dict(method=method, budget=0.5)
    if method.startswith("policy"):
        torch.manual_seed(0)
        kwargs = dict(policy=PolicyNet(PolicyConfig.for_model(tiny_sol, d_model=32, n_heads=2)), budget=0.5,
                      sample=method == "policy-sampled")
    lm = SolcLM(model=tiny_sol, tokenizer=ByteTok(), **kwargs)
    reqs = [req(CTX, " mat"), req(CTX, " hat and the dog ran"), req(CTX, " x"), req(CTX, " cat")]
    together = lm.loglikelihood(reqs)
    alone = [lm.loglikelihood([r])[0] for r in reqs]
    assert [g for _, g in together] == [g for _, g in alone]
    assert [lp for lp, _ in together] == pytest.approx([lp for lp, _ in alone], abs=1e-5)
    assert lm.loglikelihood(reqs) == together


def test_loglikelihood_splits_context_and_continuation_as_lm_eval_does(tiny_sol):
    """lm_eval's models move a context's trailing whitespace to the continuation; an empty continuation
    has log-probability 0 and is greedy."""
    lm = SolcLM(model=tiny_sol, tokenizer=ByteTok(), budget=1.0)
    (a, _), (b, _), empty, (c, _) = lm.loglikelihood([req("The cat ", "sat"), req("The cat", " sat"), req(CTX, ""),
                                                       req("The cat \n", "sat")])
    assert a == b == pytest.approx(_dense_loglik(tiny_sol, list(b"The cat sat"), len("The cat")), abs=2e-4)
    assert c == pytest.approx(_dense_loglik(tiny_sol, list(b"The cat \nsat"), len("The cat")), abs=2e-4)
    assert empty == (0.0, True)


def _cost_policy(sol):
    from runtime.budget import BudgetSpec
    from runtime.cost_model import BytesCostModel

    torch.manual_seed(0)
    spec = BudgetSpec.cost(BytesCostModel.for_model(sol), context=28)
    return PolicyNet(PolicyConfig.for_model(sol, d_model=32, n_heads=2, budget=spec))


def test_a_cost_budget_policy_reads_one_cost_fraction_as_generate_does(tiny_sol):
    """budget=0.8 with a policy trained for a cost budget is a cost fraction (the policy's own spec), in
    loglikelihood and generate_until alike, with the realized cost reported; out-of-range and per-axis
    budgets are refused up front."""
    import solc
    from runtime.policy import PolicySource

    policy = _cost_policy(tiny_sol)
    lm = SolcLM(model=tiny_sol, tokenizer=ByteTok(), policy=policy, budget=0.8)
    (lp, _), = lm.loglikelihood([req(CTX, " mat and the dog")])
    ref = score(tiny_sol, torch.tensor([list((CTX + " mat and the dog").encode())]), len(CTX),
                policy=PolicySource(policy, greedy=True), budget=0.8)
    assert lp == pytest.approx(float(ref.logprobs.double().sum()), abs=1e-4)
    assert lm.last_budget["cost"] == pytest.approx(ref.budget["cost"], abs=1e-9)
    assert lm.last_budget["attn"] == pytest.approx(ref.budget["attn"], abs=1e-9)
    (text,) = lm.generate_until([req(CTX, {"max_gen_toks": 6})])
    g = generate(tiny_sol, torch.tensor([list(CTX.encode())]), policy=PolicySource(policy, greedy=True), budget=0.8,
                 max_new_tokens=6, eos_token_id=0)
    assert text == _generated(tiny_sol, CTX, 6, policy=PolicySource(policy, greedy=True), budget=0.8)
    assert lm.last_budget["cost"] == pytest.approx(g.budget["cost"], abs=1e-9)
    with pytest.raises(solc.ArgumentError, match="feasible cost range") as info:
        SolcLM(model=tiny_sol, tokenizer=ByteTok(), policy=policy, budget=0.05)
    assert info.value.argument == "budget"
    with pytest.raises(solc.ArgumentError, match="trained for a cost budget") as info:
        SolcLM(model=tiny_sol, tokenizer=ByteTok(), policy=policy, budget="0.8/0.9/1")
    assert info.value.argument == "budget"


@pytest.mark.parametrize("kwargs, argument, text", [
    (dict(method="random-search"), "method", "searched on validation contexts"),
    (dict(method="uniform:999"), "method", "index in 0..26"),
    (dict(method="policy"), "method", "needs policy="),
    (dict(method=3), "method", "one of"),
    (dict(seed=-1), "seed", "an int in 0.."),
    (dict(budget={"attn": 0.5, "typo": 1.0}), "budget", "unknown axes"),
])
def test_methods_and_seed_are_checked_up_front(tiny_sol, kwargs, argument, text):
    import solc

    with pytest.raises(solc.ArgumentError, match=text) as info:
        SolcLM(model=tiny_sol, tokenizer=ByteTok(), **kwargs)
    assert info.value.argument == argument
    assert SolcLM(model=tiny_sol, tokenizer=ByteTok(), budget={"attn": 0.5}).target == (0.5, 1.0, 1.0)
