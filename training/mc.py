"""Multiple-choice data and scoring with an action source active on the answer continuations.

    task = load_task("bigbench:general_knowledge", shots=0, max_questions=40)
    res = score_task(sol, tokenizer, task, {"fixed@0.6": (Fixed(), 0.6), "policy@0.6": (PolicySource(net), 0.6)})
    res["fixed@0.6"].accuracy, res["fixed@0.6"].budget       # realized per-axis budget of what ran

Data (prepared at set-up by solc.eval_assets.prepare_mc; never fetched here):
  bigbench:<task>   a BIG-bench JSON task (bigbench==1.0.0 sdist), formatted as BIG-bench's
                    json_task.default_format_fn does: task_prefix + "\\nQ: " + input, the choices
                    appended as "\\n  choice: <c>" (sorted, then shuffled with a per-question seed), then
                    "\\nA: "; each choice is a continuation. Few-shot: `shots` other examples of the task,
                    each with its answer, joined by " " before the question (BIG-bench's separator).
  mmlu:<file>       MMLU-format questions (evals==3.0.1.post1, registry/data/sandbagging/<file>.jsonl):
                    the question text already lists "A. .. D." and ends with "Answer:"; the
                    continuations are " A" .. " D". Few-shot: `shots` other questions with their answer,
                    each followed by a blank line.
Whitespace at the end of a prompt moves to the front of every continuation (lm-eval's convention),
and the continuation tokens are those of tokenize(prompt + continuation) after tokenize(prompt).

Scoring protocol (the deployment protocol, runtime/stepper.py, as runtime.generate.score): the prompt minus its last `tail` + 1
tokens is prefilled densely ONCE per question; its KV cache is repeated for every (source, choice) row;
controlled step t feeds the previous token (the prompt's tail first, then the prompt's last token and
the continuation) with the action the row's source picked; the steps that predict continuation tokens
are scored. A choice's score is the sum of its tokens' log-probs (BIG-bench's multiple_choice_grade and
lm-eval's `acc`); the prediction is the argmax (first on ties). The budget counts the controlled steps
that ran on a real token (prompt tail and continuation, not the padding of a shorter choice) and is
computed from the actions that ran (DESIGN invariant 4). With tail 0 an answer of one token is ONE
controlled step, where no source can realize a budget between two grid levels; a tail of ~15 gives the
source as many steps as a training episode. Row-independent
sources (everything but a policy) are wrapped in SharedRows so all choices of a question run the same
schedule; a policy picks per row, from that row's tokens.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from runtime.actions import AXES
from runtime.costs import BudgetMeter, realized_budget
from runtime.schedulers import ActionSource
from runtime.stepper import Stepper, collector_paused
from training.baselines import Composite, SharedRows, target_key


@dataclass(frozen=True)
class MCQuestion:
    context: str  # the full prompt (few-shot examples included)
    choices: tuple[str, ...]  # continuations, leading whitespace included
    answer: int  # index of the correct choice


@dataclass
class MCTask:
    name: str
    questions: list[MCQuestion]

    @property
    def chance(self) -> float:
        return sum(1 / len(q.choices) for q in self.questions) / max(1, len(self.questions))


def _move_space(context: str, choices: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    stripped = context.rstrip()
    moved = context[len(stripped):]
    return stripped, tuple(moved + c for c in choices)


def _check_counts(name: str, available: int, shots, max_questions, what: str) -> None:
    """shots in 0..available-1 (each question's demonstrations are other questions of the task);
    max_questions None or >= 1. Raises ArgumentError naming the argument."""
    from runtime.errors import ArgumentError
    from runtime.validation import check_int

    if available == 0:
        raise ArgumentError("task", f"task {name} has no {what}: nothing to evaluate")
    check_int("shots", shots, 0, available - 1, f"each question's shots are other {what} of the task, which has {available}")
    if max_questions is not None:
        check_int("max_questions", max_questions, 1, why="None for every question")


# -- BIG-bench --------------------------------------------------------------------------------------
def _bigbench_format(task: dict, example: dict, seed: int) -> tuple[str, list[str], int]:
    """(formatted input ending in the output prefix, choices, index of the best choice)."""
    input_prefix = task.get("example_input_prefix", "\nQ: ")
    output_prefix = task.get("example_output_prefix", "\nA: ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    scores = example["target_scores"]
    choices = list(scores)
    text = example["input"]
    if task.get("append_choices_to_input", True):
        shown = sorted(choices)
        random.Random(seed).shuffle(shown)
        text = text + choice_prefix + choice_prefix.join(shown)
    best = max(scores.values())
    answer = next(i for i, c in enumerate(choices) if scores[c] == best)  # first max, as BIG-bench
    return input_prefix + text + output_prefix, choices, answer


def bigbench_questions(task: dict, shots: int = 0, max_questions: int | None = None, seed: int = 42) -> list[MCQuestion]:
    """Questions of a BIG-bench JSON task (its multiple-choice examples), 0- or few-shot."""
    examples = [e for e in task.get("examples", []) if "target_scores" in e]
    _check_counts(f"BIG-bench {task.get('name')!r}", len(examples), shots, max_questions, "multiple-choice examples")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    picked = order[: max_questions or len(order)]
    prefix = task.get("task_prefix", "")
    formatted = [_bigbench_format(task, e, seed * 100_003 + i) for i, e in enumerate(examples)]
    out = []
    for i in picked:
        text, choices, answer = formatted[i]
        if shots:
            others = rng.sample([j for j in range(len(examples)) if j != i], shots)
            demo = " ".join(formatted[j][0] + formatted[j][1][formatted[j][2]] for j in others)
            text = demo + " " + text
        context, conts = _move_space(prefix + text, choices)
        out.append(MCQuestion(context, conts, answer))
    return out


# -- MMLU format ------------------------------------------------------------------------------------
LETTERS = "ABCDEFGHIJ"


def mmlu_questions(rows: Sequence[dict], shots: int = 0, max_questions: int | None = None, seed: int = 0) -> list[MCQuestion]:
    """Questions of MMLU-format rows {"question": "...\\nA. ..\\nAnswer:", "answer": "B"}."""
    _check_counts("MMLU-format", len(rows), shots, max_questions, "questions")
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    out = []
    for i in order[: max_questions or len(order)]:
        q = rows[i]["question"].rstrip()
        n = sum(1 for letter in LETTERS if f"\n{letter}. " in "\n" + q)
        if n < 2 or rows[i]["answer"] not in LETTERS[:n]:
            raise ValueError(f"row {i} is not an MMLU-format question: {rows[i]!r:.200}")
        demo = ""
        if shots:
            others = rng.sample([j for j in range(len(rows)) if j != i], shots)
            demo = "".join(f"{rows[j]['question'].rstrip()} {rows[j]['answer']}\n\n" for j in others)
        out.append(MCQuestion(demo + q, tuple(f" {letter}" for letter in LETTERS[:n]), LETTERS.index(rows[i]["answer"])))
    return out


def load_task(spec: str, shots: int = 0, max_questions: int | None = None, seed: int = 0, root: Path | None = None) -> MCTask:
    """`bigbench:<task>` or `mmlu:<file>` from the prepared folder (solc.eval_assets.mc_dir())."""
    from solc.eval_assets import mc_dir

    root = Path(root) if root is not None else mc_dir()
    kind, _, name = spec.partition(":")
    if kind == "bigbench":
        path = root / "bigbench" / f"{name}.json"
    elif kind == "mmlu":
        path = root / "mmlu" / f"{name}.jsonl"
    else:
        raise ValueError(f"task {spec!r}: expected 'bigbench:<task>' or 'mmlu:<file>'")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m solc.eval_assets` (solc.eval_assets.prepare_mc()) at set-up")
    if kind == "bigbench":
        questions = bigbench_questions(json.loads(path.read_text()), shots, max_questions, seed=42 + seed)
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        questions = mmlu_questions(rows, shots, max_questions, seed)
    return MCTask(f"{spec}/{shots}shot", questions)


# -- tokenisation -----------------------------------------------------------------------------------
def encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the continuation is what tokenize(context + continuation) adds
    after tokenize(context). An empty context becomes the EOS (or BOS) token."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids if context else []
    if whole[: len(ctx)] != ctx:  # a merge across the boundary: keep the context's own tokens
        cont = tokenizer(continuation, add_special_tokens=False).input_ids
    else:
        cont = whole[len(ctx):]
    if not ctx:
        prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        ctx = [prefix]
    if not cont:
        raise ValueError(f"continuation {continuation!r} has no tokens")
    return ctx, cont


# -- scoring ----------------------------------------------------------------------------------------
@dataclass
class Scored:
    """Per-row results of score_continuations: rows are choice-major (row i*G + g: choice i, source g)."""

    logprob: Tensor  # [R] float64 sum of the continuation's token log-probs
    greedy: Tensor  # [R] bool: every continuation token was the argmax
    actions: Tensor  # [R, H] actions that ran
    counted: Tensor  # [R, H] bool: controlled steps that ran on a real token (prompt tail or continuation)
    kv_lens: Tensor | None = None  # [R, H] keys each step attended (its own included): what a cost budget prices


def _reads_inputs(source: ActionSource) -> bool:
    return hasattr(source, "policy")  # PolicySource (and anything wrapping a network) picks per row


@torch.no_grad()
def score_continuations(sol, context: Sequence[int], continuations: Sequence[Sequence[int]],
                        sources: Sequence[ActionSource], targets, generator=None, tail: int = 0) -> Scored:
    """Score every continuation under every source (one batch; see the module docstring).

    targets: one per source (a number or attn, mlp, bits/16 each; for a source with a cost budget spec,
    e.g. a policy trained for a cost budget, one cost fraction). Row i*G + g is continuation i under
    source g. Sources that do not read their inputs are wrapped in SharedRows. `tail`: the last `tail`
    prompt tokens before the one that predicts the answer also run as controlled steps (counted in
    the budget, not scored), so an answer of one token still gives the source tail + 1 steps over
    which to realize a fractional budget."""
    G, n = len(sources), len(continuations)
    if G == 0 or n == 0:
        raise ValueError("score_continuations needs at least one source and one continuation")
    if len(targets) != G:
        raise ValueError(f"{len(targets)} targets for {G} sources")
    if len(context) < 1 or any(len(c) < 1 for c in continuations):
        raise ValueError("context and every continuation need at least one token")
    if tail < 0:
        raise ValueError(f"tail must be >= 0 prompt tokens, got {tail}")
    device = sol.token_embedding.device
    tail = min(tail, len(context) - 1)
    lens = torch.tensor([len(c) for c in continuations])
    H = tail + int(lens.max())  # controlled steps: the prompt's tail, then the continuation
    P = len(context) - 1 - tail  # prefilled densely
    if P + H > sol.max_seq_len:
        raise ValueError(f"prompt ({len(context)}) + continuation ({H - tail}) tokens exceed max_seq_len={sol.max_seq_len}")
    R = n * G
    # feed[:, t] is the token fed at step t, gold[:, t] the token it is scored on
    width = H - tail  # the longest continuation; shorter ones are padded with their last token
    seqs = torch.tensor([list(context[P:]) + list(c) + [c[-1]] * (width - len(c)) for c in continuations], device=device)
    feed, gold = seqs[:, :H].repeat_interleave(G, 0), seqs[:, 1:].repeat_interleave(G, 0)

    src = Composite([s if _reads_inputs(s) else SharedRows(s) for s in sources])
    per_source = []
    for s, t in zip(sources, targets):
        spec = getattr(s, "budget_spec", None)
        if spec is not None and spec.is_cost:  # column 0 is the cost fraction, the others are unused (1.0)
            cost = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
            if cost.numel() != 1:
                raise ValueError(f"a source with a cost budget takes one cost fraction as its target, got {t!r}")
            per_source.append((float(cost[0]), 1.0, 1.0))
        else:  # per-axis: disabled axes always run dense
            per_source.append(tuple(x if axis in sol.space.axes else 1.0 for x, axis in zip(target_key(t), AXES)))
    rows = torch.tensor(per_source, dtype=torch.float64).repeat(n, 1)
    stepper = Stepper(sol, src)
    stepper.prefill(torch.tensor([list(context[:P])], dtype=torch.long, device=device), H, repeats=R, targets=rows, generator=generator)
    logps, greedy = [], []
    with collector_paused():
        for t in range(H):
            out = stepper.step(feed[:, t])
            logps.append(out.logprob(gold[:, t]))
            greedy.append(out.logits.argmax(-1) == gold[:, t])
    acts, ctrl = stepper.actions, stepper.controlled
    step = torch.arange(H)[None]
    real = ((step >= tail) & (step < tail + lens[:, None])).repeat_interleave(G, 0).to(device)  # scored steps
    ran = (step < tail + lens[:, None]).repeat_interleave(G, 0).to(device)  # not padding
    logp = torch.stack(logps, 1).double()
    return Scored(
        logprob=(logp * real).sum(1).cpu(),
        greedy=(torch.stack(greedy, 1) | ~real).all(1).cpu(),
        actions=acts.cpu(),
        counted=(ctrl & ran).cpu(),
        kv_lens=stepper.kv_lens.cpu(),
    )


@dataclass
class MCResult:
    meter: BudgetMeter
    correct: list[bool] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(1, len(self.correct))

    @property
    def steps(self) -> int:
        """Controlled steps counted in the budget."""
        return self.meter.steps

    @property
    def budget(self) -> dict[str, float]:
        """Realized mean cost per axis over every counted controlled step of the task."""
        mean = self.meter.mean()
        return {axis: float(mean[i]) for i, axis in enumerate(AXES)}


def score_task(sol, tokenizer, task: MCTask, methods: dict[str, tuple[Callable[[], ActionSource] | ActionSource, object]],
               generator=None, on_question: Callable[[int], None] | None = None, tail: int = 0) -> dict[str, MCResult]:
    """Accuracy of every method on `task`. methods: name -> (source or source factory, target); `tail`:
    prompt tokens run under control before the answer (score_continuations)."""
    from runtime.errors import ArgumentError

    if not task.questions:
        raise ArgumentError("task", f"task {task.name!r} has no questions: its accuracy and budget are undefined")
    if not methods:
        raise ArgumentError("methods", "methods is empty: pass at least one name -> (source, target)")
    names = list(methods)
    results = {name: MCResult(BudgetMeter(sol.space)) for name in names}
    for q in task.questions:
        ids = [encode(tokenizer, q.context, c) for c in q.choices]
        context = ids[0][0]
        if any(c[0] != context for c in ids):  # cannot happen with _move_space, but never score a mismatch
            raise ValueError(f"the choices of a question tokenise the prompt differently: {q.context[-60:]!r}")
        sources = [m() if callable(m) and not isinstance(m, ActionSource) else m for m, _ in methods.values()]
        scored = score_continuations(sol, context, [c for _, c in ids], sources, [t for _, t in methods.values()], generator, tail)
        G = len(names)
        lp = scored.logprob.view(len(q.choices), G)
        for g, name in enumerate(names):
            pred = int(lp[:, g].argmax())
            r = results[name]
            r.predictions.append(pred)
            r.correct.append(pred == q.answer)
            r.meter.add(scored.actions[g::G], scored.counted[g::G])
        if on_question is not None:
            on_question(1)
    return results


def realized(space, scored: Scored) -> Tensor:
    """[R, 3] realized per-axis budget of each row of a Scored batch."""
    return realized_budget(space, scored.actions, scored.counted)
