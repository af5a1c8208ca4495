"""Multiple-choice data formatting and scoring, on a fake model whose logits the test controls."""
import math
from types import SimpleNamespace

import pytest
import torch

from runtime.actions import ActionSpace
from runtime.kv_cache import StaticKVCache
from runtime.schedulers import Fixed
from runtime.sol_model import SOLOutput
from training.baselines import Uniform
from training.mc import MCQuestion, MCTask, bigbench_questions, encode, load_task, mmlu_questions, score_continuations, score_task

V = 256
LOW = -10.0


class ByteTok:
    """Bytes are token ids; 0 is EOS."""

    eos_token_id, bos_token_id = 0, None

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=list(text.encode()))

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


class FakeCache(StaticKVCache):
    """A cache whose one tensor is the token history ([B, 1, max_len, 1] like a key cache): what
    runtime.kv_cache.repeat_rows and StaticKVCache.rows (the stepper's prefill) work on."""

    def __init__(self, batch, max_len):
        self.batch, self.max_len = batch, max_len
        self.tensors = [torch.zeros(batch, 1, max_len, 1, dtype=torch.long)]


class FakeDispatcher:
    """What the Stepper asks of a dispatcher, running the fake model."""

    def __init__(self, sol):
        self.sol = sol

    def cache(self, slot, batch, max_len, device=None):
        return self.sol.new_cache(batch, max_len)

    def prefill(self, ids, positions, cache, kv_len=None):
        return self.sol(ids, None, positions, cache).hidden  # StepDispatcher.prefill returns the hidden states

    def step(self, ids, actions, positions, cache, action=None, kv_len=None):
        return self.sol(ids, actions, positions, cache)


class FakeSOL:
    """A 'model' whose next-token logits the test sets: after ' ', it prefers the letter PREF[question]
    (the question is the first token of the sequence) when the step runs dense, LOW_PREF[question] when
    it runs any other action; after anything else it predicts ' '. Every other logit is LOW."""

    PREF = {"1": "B", "2": "C", "3": "A"}
    LOW_PREF = {"1": "A", "2": "C", "3": "C"}

    def __init__(self):
        self.space = ActionSpace(quant="activation")  # the paper's grid: the lowest bits/16 is 0.3125
        self.dtype = torch.float32
        self.max_seq_len = 64
        self.token_embedding = torch.zeros(V, 4)
        self.calls = []

    def new_cache(self, batch, max_len=None, device=None):
        return FakeCache(batch, max_len or self.max_seq_len)

    @property
    def dispatcher(self):
        return FakeDispatcher(self)

    def __call__(self, ids, actions, positions, cache):
        hist = cache.tensors[0][:, 0, :, 0]
        hist.scatter_(1, positions, ids)
        B, T = ids.shape
        if actions is None:
            actions = torch.full((B, T), self.space.dense_index)
        self.calls.append(actions.clone())
        logits = torch.full((B, T, V), LOW)
        for b in range(B):
            q = chr(int(hist[b, 0]))
            for t in range(T):
                if int(ids[b, t]) == ord(" "):
                    pref = self.PREF if int(actions[b, t]) == self.space.dense_index else self.LOW_PREF
                    logits[b, t, ord(pref.get(q, "A"))] = 0.0
                else:
                    logits[b, t, ord(" ")] = 0.0
        return SOLOutput(logits, torch.zeros(B, T, 4))


# log-prob of the preferred token and of any other one, under the fake logits
LP_TOP = -math.log(1 + (V - 1) * math.exp(LOW))
LP_OTHER = LOW + LP_TOP

ROWS = [
    {"question": "1?\nA. x\nB. y\nC. z\nAnswer:", "answer": "B"},
    {"question": "2?\nA. x\nB. y\nC. z\nAnswer:", "answer": "C"},
    {"question": "3?\nA. x\nB. y\nC. z\nAnswer:", "answer": "C"},
]


def _task():
    return MCTask("hand-made", mmlu_questions(ROWS, shots=0))


def test_mmlu_format_and_tokenisation():
    qs = mmlu_questions(ROWS)
    assert sorted(q.context[0] for q in qs) == ["1", "2", "3"]
    q = next(q for q in qs if q.context.startswith("2"))
    assert q.choices == (" A", " B", " C") and q.answer == 2 and q.context.endswith("Answer:")
    ctx, cont = encode(ByteTok(), q.context, q.choices[1])
    assert ctx == list(q.context.encode()) and cont == [ord(" "), ord("B")]
    few = mmlu_questions(ROWS, shots=2)
    q = next(q for q in few if q.context.split("\n\n")[-1].startswith("1"))
    assert q.context.count("Answer:") == 3 and "Answer: B\n\n" not in q.context.split("\n\n")[-1]


def test_expected_choices_dense_and_under_a_low_action():
    sol, tok = FakeSOL(), ByteTok()
    task = _task()
    res = score_task(sol, tok, task, {
        "dense": (Uniform(sol.space.dense_index), 1.0),
        "low": (Uniform(0), 1.0),
        "fixed-dense": (Fixed(), 1.0),
        "fixed-min": (Fixed, (0.1, 0.4, 0.3125)),  # a factory works too; lowest level on every axis = action 0
    })
    letters = lambda name: {q.context[0]: "ABC"[p] for q, p in zip(task.questions, res[name].predictions)}  # noqa: E731
    assert letters("dense") == {"1": "B", "2": "C", "3": "A"}
    assert letters("low") == {"1": "A", "2": "C", "3": "C"}
    assert letters("fixed-dense") == letters("dense") and letters("fixed-min") == letters("low")
    assert res["dense"].accuracy == pytest.approx(2 / 3) and res["low"].accuracy == pytest.approx(2 / 3)
    # the budget counts the continuation steps that ran: 2 tokens x 3 choices x 3 questions
    assert res["low"].steps == 18 and res["low"].budget == pytest.approx({"attn": 0.1, "mlp": 0.4, "quant": 5 / 16})
    assert res["dense"].budget == pytest.approx({"attn": 1.0, "mlp": 1.0, "quant": 1.0})


def test_scores_are_sums_of_token_logprobs_and_padding_is_masked():
    sol, tok = FakeSOL(), ByteTok()
    ctx, a = encode(tok, "1? pick one:", " B")
    _, b = encode(tok, "1? pick one:", " Bxy")
    s = score_continuations(sol, ctx, [a, b], [Uniform(sol.space.dense_index), Uniform(0)], [1.0, 1.0])
    # rows choice-major: (a, dense), (a, low), (b, dense), (b, low)
    assert s.logprob[0].item() == pytest.approx(2 * LP_TOP, abs=1e-5)  # ' ' then the preferred 'B'
    assert s.logprob[1].item() == pytest.approx(LP_TOP + LP_OTHER, abs=1e-5)  # low action prefers 'A'
    # ' B' then 'x' (after 'B' the model wants ' ') then 'y' (after 'x' likewise)
    assert s.logprob[2].item() == pytest.approx(2 * LP_TOP + 2 * LP_OTHER, abs=1e-5)
    assert s.greedy.tolist() == [True, False, False, False]
    assert s.counted.sum(1).tolist() == [2, 2, 4, 4]
    # (the prompt is longer than DENSE_PREFIX, so no step is forced dense)
    # one dense prefill of the prompt minus its last token, then one call per step for all rows
    assert sol.calls[0].shape == (1, len(ctx) - 1) and all(c.shape == (4, 1) for c in sol.calls[1:])


def test_bigbench_format_follows_json_task():
    task = {
        "name": "t",
        "examples": [
            {"input": "How many legs do horses have?", "target_scores": {"two": 0, "four": 1, "six": 0}},
            {"input": "Sky colour?", "target_scores": {"blue": 1, "green": 0}},
            {"input": "Two plus two?", "target_scores": {"three": 0, "four": 1}},
        ],
    }
    qs = bigbench_questions(task, shots=0)
    q = next(q for q in qs if "horses" in q.context)
    assert q.context.startswith("\nQ: How many legs do horses have?\n  choice: ")
    assert q.context.endswith("\nA:") and q.choices == (" two", " four", " six") and q.answer == 1
    assert sorted(q.context.split("\n  choice: ")[1:])[0].startswith("four")
    few = bigbench_questions(task, shots=1)
    q = next(q for q in few if q.context.endswith("Two plus two?" + q.context.split("Two plus two?")[-1]) and "Two plus two?" in q.context.split("\nA: ")[-1])
    assert q.context.count("\nA: ") == 1 and q.context.count("\nA:") == 2  # one solved example, then the question


def test_load_task_names_the_setup_step(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval_assets"):
        load_task("bigbench:general_knowledge", root=tmp_path)
    with pytest.raises(ValueError, match="bigbench:<task>"):
        load_task("nope", root=tmp_path)


def test_prompt_tail_runs_under_control_and_equals_a_teacher_forced_pass(tiny_sol64):
    sol = tiny_sol64
    g = torch.Generator().manual_seed(7)
    ctx = torch.randint(1, 90, (20,), generator=g).tolist()  # chr(id + 32): printable, no whitespace
    conts = [[5], [9, 11, 3]]
    a, tail = 4, 6
    s = score_continuations(sol, ctx, conts, [Uniform(a)], [1.0], tail=tail)
    P = len(ctx) - 1 - tail  # prefilled densely; every later step runs action a
    for i, c in enumerate(conts):
        ids = torch.tensor([ctx + c])
        actions = torch.full_like(ids, sol.space.dense_index)
        actions[0, P:] = a
        logp = torch.log_softmax(sol(ids, actions).logits[0].double(), -1)
        expect = sum(logp[len(ctx) - 1 + j, tok].item() for j, tok in enumerate(c))
        assert s.logprob[i].item() == pytest.approx(expect, abs=1e-6)
    # the tail counts in the budget, the padding of the shorter choice does not
    assert s.counted.sum(1).tolist() == [tail + 1, tail + 3]
    # a one-token answer with a 15-token tail: Fixed realizes a fractional budget over 16 steps
    target = (0.6, 0.6, 0.6)
    res = score_task(sol, ByteTokShort(), MCTask("t", [_mcq(ctx, [[5], [9]])]), {"fixed": (Fixed(), target)}, tail=15)
    for axis, want in zip(("attn", "mlp", "quant"), target):
        assert abs(res["fixed"].budget[axis] - want) <= 0.02 + 1e-9
    res0 = score_task(sol, ByteTokShort(), MCTask("t", [_mcq(ctx, [[5], [9]])]), {"fixed": (Fixed(), target)})
    assert res0["fixed"].steps == 2  # without a tail: one step per one-token choice
    with pytest.raises(ValueError, match="tail must be >= 0"):
        score_continuations(sol, ctx, conts, [Uniform(a)], [1.0], tail=-1)


class ByteTokShort(ByteTok):
    """Token ids are the characters' code points minus 32 (prompts of chr(id + 32))."""

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[ord(ch) - 32 for ch in text])


def _mcq(ctx, choices):
    return MCQuestion("".join(chr(t + 32) for t in ctx), tuple("".join(chr(t + 32) for t in c) for c in choices), 0)


def test_question_counts_are_checked_and_an_empty_task_is_refused(tiny_sol64):
    import solc

    rows = [{"question": f"Q{i}?\nA. x\nB. y\nAnswer:", "answer": "A"} for i in range(3)]
    task = {"name": "t", "examples": [{"input": f"q{i}", "target_scores": {"a": 1, "b": 0}} for i in range(3)]}
    for make in (lambda **kw: mmlu_questions(rows, **kw), lambda **kw: bigbench_questions(task, **kw)):
        assert len(make(max_questions=2)) == 2 and len(make(shots=2)) == 3
        for kw, argument, text in [(dict(max_questions=0), "max_questions", ">= 1"), (dict(max_questions=-1), "max_questions", ">= 1"),
                                   (dict(shots=3), "shots", "0..2"), (dict(shots=-1), "shots", "0..2")]:
            with pytest.raises(solc.ArgumentError, match=text) as info:
                make(**kw)
            assert info.value.argument == argument
    with pytest.raises(solc.ArgumentError, match="no questions") as info:
        mmlu_questions([])
    assert info.value.argument == "task"
    with pytest.raises(solc.ArgumentError, match="no questions") as info:
        score_task(tiny_sol64, None, MCTask("empty", []), {"fixed": (Fixed(), 0.6)})
    assert info.value.argument == "task"


def test_a_cost_budget_policy_keeps_its_cost_target_on_a_space_without_attn():
    """A cost-budget policy reads its cost fraction in column 0 whatever the axes: on a space without
    attn, score_continuations must not reset that column to 1.0 (dense) as it does per-axis targets of
    a disabled axis; its actions equal the runtime's score() of the same tokens at the same budget."""
    import solc
    from runtime.budget import BudgetSpec
    from runtime.cost_model import BytesCostModel
    from runtime.generate import score
    from runtime.policy import PolicyConfig, PolicyNet, PolicySource

    sol = solc.compile(solc.load_model("tiny-llama", dtype=torch.float64), max_seq_len=48, actions=["mlp", "quant"],
                       quant="activation")
    torch.manual_seed(0)
    spec = BudgetSpec.cost(BytesCostModel.for_model(sol), context=28)
    policy = PolicyNet(PolicyConfig.for_model(sol, d_model=32, n_heads=2, budget=spec)).double()
    ctx, cont = list(b"The cat sat on the mat and then"), list(b" the dog ran")
    s = score_continuations(sol, ctx, [cont], [PolicySource(policy, greedy=True)], [0.9])
    ref = score(sol, torch.tensor([ctx + cont]), len(ctx), policy=PolicySource(policy, greedy=True), budget=0.9)
    assert s.actions.tolist() == ref.actions.tolist()
    assert (s.actions != sol.space.dense_index).any()  # 0.9 of the dense cost: not every step dense
    assert s.logprob[0].item() == pytest.approx(float(ref.logprobs.double().sum()), abs=1e-9)
    assert s.kv_lens.tolist() == [list(range(len(ctx), len(ctx) + len(cont)))]
    with pytest.raises(ValueError, match="one cost fraction"):
        score_continuations(sol, ctx, [cont], [PolicySource(policy, greedy=True)], [(0.9, 0.9, 0.9)])
