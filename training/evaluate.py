"""Evaluation: quality at matched budget for the policy and the baselines, Pareto front, adherence.

    python -m training.evaluate --policy runs/default/policy.pt --budgets 0.4,0.5,0.6,0.7,0.8 --out runs/eval

For each method (policy, fixed, random, random-search; see training/baselines.py) and each budget:
  * perplexity over the controlled steps on the TEST split, with the training episode protocol
    (training/episodes.py: dense prefill of a context, then T teacher-forced controlled steps). All
    methods, budgets and every uniform action run on the same contexts in one shared-prefill batch.
    Random search picks its schedule on the VALIDATION split (best of --search-n) and is scored here.
  * multiple-choice accuracy with the source active on the answer continuations (training/mc.py:
    dense prefill of the prompt minus its last --mc-tail tokens, then one controlled step per prompt
    tail token and per continuation token, only the latter scored), on BIG-bench tasks and
    MMLU-format questions, 0-shot and few-shot; a dense reference row per task.
  * the realized budget per axis and the net keep (mean over enabled axes), from the actions that ran.
  * fixed@policy and random@policy (with a policy, unless --matched-draws 0): Fixed and Random run
    at the budget the policy REALIZED on each test context (per axis), so the paired differences
    "policy - fixed@policy" compare schedules at matched realized budget, not at the same request
    (the policy may over- or underspend its request; Fixed realizes it within one step).
Budgets: one number per budget (the same target on every enabled axis) or attn/mlp/bits16 triples.

A COST-budget policy (training.grpo's default) is compared as training.cost_eval does instead: each
budget is one cost fraction in the policy's feasible range; the policy (greedy) against the best static
hull mix, Fixed and Random (unless "random" is left out of --methods) at each episode's realized cost,
and random search at a cost (with "random-search" in --methods), on perplexity only (--mc-tasks
defaults to none for such a policy; --sample, --uniform, --mc-methods and per-axis triples do not apply).

Writes to --out (per-axis policies and baselines only): results.csv (one row per eval, method, budget),
pareto.png (quality vs realized net keep, one line per method; uniform actions as points), report.md
(tables: perplexity and accuracy per method and budget, paired differences, the policy's budget
adherence), command.txt, and TensorBoard scalars under tb/ (tag <eval>/<method>/<metric>, step =
round(100 * requested budget), or round(100 * net keep) for uniform actions). For a cost-budget policy:
report.md, results.json and command.txt. A tqdm bar tracks contexts and questions. The finished parts
(random search, each perplexity chunk, the matched baselines, each multiple-choice task) are kept in
--out/progress.partial.pt while it runs, until every output is written: the same command after an
interrupt (Ctrl-C: exit 130) resumes there, with the same results. An --out that holds a training run is
refused, and one that holds another evaluation (a different command.txt) unless --overwrite replaces it;
files of an evaluation's names that no evaluation wrote (no command.txt of training.evaluate) are never
replaced. Options are checked before the model loads (also the actions --uniform and uniform:<i> name,
and the multiple-choice files), each error one line naming the option; so is an evaluation of nothing
(no method to run, or --test-contexts 0 without --mc-tasks) and a budget or method given twice.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before torch loads
    from training.startup import quiet_ctrl_c_while_loading

    quiet_ctrl_c_while_loading("evaluate")

import argparse
import csv
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from runtime import validation
from runtime.actions import AXES, ActionSpace
from runtime.errors import ArgumentError, ArgumentTypeError, SolcError
from solc.models import DTYPES, resolve_device, resolve_dtype
from training.baselines import (Composite, MatchedBaselines, SearchResult, axis_targets, build_source,
                                matched_baselines, random_search, target_key)
from solc.cache import atomic_write_bytes
from training.cli import ProgressFile, command_line, fingerprint, write_json
from training.episodes import rollout
from training.startup import ctrl_c_raises

DEFAULT_METHODS = ("policy", "fixed", "random", "random-search")
DEFAULT_MC_TASKS = ("bigbench:general_knowledge", "bigbench:human_organs_senses", "mmlu:samples-all")


@dataclass
class EvalConfig:
    policy: str
    model: str = "smollm2-135m"
    corpus: str = "shakespeare"
    budgets: list = field(default_factory=lambda: [0.4, 0.5, 0.6, 0.7, 0.8])
    methods: list = field(default_factory=lambda: list(DEFAULT_METHODS))
    uniform: str = "all"  # perplexity of uniform actions: "all", "dense", "none" or indices "0,13,26"
    mc_methods: list | None = None  # methods scored on multiple choice (default: methods)
    context_length: int = 256
    horizon: int = 16
    test_contexts: int = 8
    val_contexts: int = 2
    search_n: int = 30
    mc_tasks: list = field(default_factory=lambda: list(DEFAULT_MC_TASKS))
    mc_shots: list = field(default_factory=lambda: [0, 3])
    mc_questions: int = 40
    mc_tail: int = 15  # prompt tokens run under control before the answer (training/mc.py); 15 + 1 = T
    max_rows: int = 160  # rows per batched rollout (bounds the KV cache memory)
    matched_draws: int = 4  # Random draws per context for random@policy; 0 = no matched baselines
    greedy: bool = True  # policy: argmax (deployment) or sampled at the policy's temperature
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    out: str = "runs/eval"
    threads: int = 0
    progress: bool = True
    overwrite: bool = False  # replace another evaluation in --out

    def __post_init__(self):
        """Check every field; an error names it (as the CLI flag), its value and what is valid."""
        for name in ("policy", "model", "corpus", "out", "dtype", "device"):
            if not isinstance(getattr(self, name), str):
                _bad(name, getattr(self, name), "a string", type_error=True)
        if not isinstance(self.budgets, (list, tuple)) or not self.budgets:
            _bad("budgets", self.budgets, "at least one budget: a number in (0, 1] or an attn/mlp/bits16 triple")
        self.budgets = [check_budget_value(b) for b in self.budgets]
        keys = [target_key(b) for b in self.budgets]
        twice = next((b for b, k in zip(self.budgets, keys) if keys.count(k) > 1), None)
        if twice is not None:
            _bad("budgets", twice, "each budget once (0.6 and 0.6/0.6/0.6 are the same target)")
        for name in ("methods", "mc_methods"):
            methods = getattr(self, name)
            if methods is None and name == "mc_methods":
                continue
            if not isinstance(methods, (list, tuple)) or not all(isinstance(m, str) for m in methods):
                _bad(name, methods, "a list of method names", type_error=True)
            for m in methods:
                if m not in DEFAULT_METHODS and not (m.startswith("uniform:") and m.split(":", 1)[1].isdigit()):
                    _bad(name, m, f"methods from {list(DEFAULT_METHODS)} or uniform:<action index>")
                if methods.count(m) > 1:
                    _bad(name, m, "each method once")
        parse_uniform(self.uniform)
        for name, lo in (("horizon", 1), ("test_contexts", 0), ("val_contexts", 0), ("search_n", 1), ("mc_questions", 1),
                         ("mc_tail", 0), ("max_rows", 1), ("matched_draws", 0), ("threads", 0)):
            validation.check_int(_flag(name), getattr(self, name), lo)
        validation.check_int("--seed", self.seed, 0, validation.MAX_SEED - 1)
        validation.check_int("--context-length", self.context_length, max(validation.MIN_SEQ_LEN, self.horizon + 2), None,
                             f"at least --horizon + 2 = {self.horizon + 2} and {validation.MIN_SEQ_LEN}")
        run = [m for m in self.methods if m != "policy" or self.policy]  # policy needs --policy
        if self.test_contexts > 0 and not run and parse_uniform(self.uniform) in ("none", ""):
            _bad("methods", ",".join(self.methods), "at least one method to evaluate (policy needs a --policy; "
                 "or uniform actions with --uniform)")
        if self.test_contexts == 0 and not self.mc_tasks:
            _bad("test_contexts", 0, "an int >= 1 when --mc-tasks is empty (nothing would be evaluated)")
        if "random-search" in self.methods and self.val_contexts < 1:
            _bad("val_contexts", self.val_contexts, "an int >= 1 (random-search selects its schedule on validation contexts)")
        if not isinstance(self.mc_tasks, (list, tuple)) or not all(isinstance(t, str) for t in self.mc_tasks):
            _bad("mc_tasks", self.mc_tasks, "a list of bigbench:<task> / mmlu:<file>", type_error=True)
        for task in self.mc_tasks:
            if task.partition(":")[0] not in ("bigbench", "mmlu") or not task.partition(":")[2]:
                _bad("mc_tasks", task, "bigbench:<task> or mmlu:<file>")
        if not isinstance(self.mc_shots, (list, tuple)):
            _bad("mc_shots", self.mc_shots, "a list of shot counts", type_error=True)
        for shots in self.mc_shots:
            validation.check_int("--mc-shots", shots, 0)
        if self.dtype not in DTYPES:
            _bad("dtype", self.dtype, f"one of {sorted(DTYPES)}")
        resolve_device(self.device, argument="--device")
        for name in ("greedy", "progress", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                _bad(name, getattr(self, name), "True or False", type_error=True)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bad(name: str, value, valid: str, type_error: bool = False):
    cls = ArgumentTypeError if type_error else ArgumentError
    raise cls(_flag(name), f"{_flag(name)} {value!r} is invalid: {valid}")


def check_budget_value(budget):
    """One requested budget: a number in (0, 1] or an (attn, mlp, bits/16) triple of them."""
    valid = "a number in (0, 1] or an attn/mlp/bits16 triple of numbers in (0, 1]"
    values = list(budget) if isinstance(budget, (list, tuple)) else [budget]
    if len(values) not in (1, 3):
        _bad("budgets", budget, valid)
    for v in values:
        try:
            validation.check_real("--budgets", v, 0.0, 1.0, lo_open=True)
        except ArgumentError:
            _bad("budgets", budget, valid, type_error=isinstance(v, str))
    return float(values[0]) if len(values) == 1 and not isinstance(budget, (list, tuple)) else tuple(float(v) for v in values)


def parse_uniform(spec) -> list | str:
    """'all' | 'none' | 'dense' | comma-separated action indices (True/False: all/none), syntax only."""
    spec = {True: "all", False: "none"}.get(spec, spec)
    if spec in ("all", "none", ""):
        return spec
    if not isinstance(spec, str):
        _bad("uniform", spec, "all | none | dense | comma-separated action indices", type_error=True)
    parts = [p.strip() for p in spec.split(",")]
    for part in parts:
        if part != "dense" and not part.isdigit():
            _bad("uniform", spec, "all | none | dense | comma-separated action indices, e.g. 0,13,dense")
    return parts


def load_policy(path: str, argument: str = "--policy"):
    """The PolicyNet in a policy.pt written by training.grpo (PolicyNet.load); an ArgumentError naming
    `argument` for anything else, with PolicyNet.load's reason."""
    from runtime.policy import PolicyFileError, PolicyNet

    file = Path(path)
    if not file.is_file():
        raise ArgumentError(argument, f"{argument} {path}: no such file (give the policy.pt a training run wrote)")
    try:
        return PolicyNet.load(file)
    except PolicyFileError as e:
        raise ArgumentError(argument, f"{argument} {e}") from None


@dataclass
class Entry:
    """One (method, budget) to evaluate: how to build its source and the target it is given."""

    method: str
    budget: object  # the requested budget (a number or a triple), None for uniform actions
    target: tuple  # per-axis target (attn, mlp, bits/16)
    make: Callable | None  # None for entries derived from another's result (fixed@policy, random@policy)


def _budget_label(budget) -> str:
    if budget is None:
        return ""
    key = target_key(budget)
    return f"{key[0]:g}" if key[0] == key[1] == key[2] else "/".join(f"{x:g}" for x in key)


def _budget_step(budget) -> int:
    return int(round(100 * sum(target_key(budget)) / 3))


def uniform_indices(space, spec) -> list[int]:
    """'all' | 'none' | 'dense' | comma-separated action indices (True/False: all/none)."""
    parts = parse_uniform(spec)
    if parts == "all":
        return list(range(len(space)))
    if parts in ("none", ""):
        return []
    out = []
    for part in parts:
        idx = space.dense_index if part == "dense" else int(part)
        if not 0 <= idx < len(space):
            raise ArgumentError("--uniform", f"--uniform: action {idx} is outside 0..{len(space) - 1} (this action space has {len(space)} actions)")
        out.append(idx)
    return out


def check_actions(space, cfg: EvalConfig) -> None:
    """--uniform and every uniform:<i> of --methods / --mc-methods name actions of `space`."""
    uniform_indices(space, cfg.uniform)
    for name in ("methods", "mc_methods"):
        for m in getattr(cfg, name) or []:
            if m.startswith("uniform:") and not int(m.split(":", 1)[1]) < len(space):
                _bad(name, m, f"uniform:<i> with an action index in 0..{len(space) - 1} (this action space has "
                              f"{len(space)} actions)")


def load_tasks(cfg: EvalConfig) -> list:
    """The multiple-choice tasks of --mc-tasks x --mc-shots (an ArgumentError naming --mc-tasks when a
    task's file is missing or holds too few questions for the shots)."""
    from training import mc

    tasks = []
    for spec in cfg.mc_tasks:
        for shots in cfg.mc_shots:
            try:
                tasks.append(mc.load_task(spec, shots=shots, max_questions=cfg.mc_questions, seed=cfg.seed))
            except (ValueError, FileNotFoundError) as e:
                raise ArgumentError("--mc-tasks", f"--mc-tasks {spec}: {e}") from None
    return tasks


def make_entries(space, methods, budgets, policy=None, searched=None, greedy=True, uniform="none") -> list[Entry]:
    out = []
    for budget in budgets:
        target = axis_targets(space, budget)
        for m in methods:
            make = (lambda m=m, target=target: build_source(m, target=target, policy=policy, searched=searched, greedy=greedy))
            make()  # fail early on a bad name or a missing search
            out.append(Entry(m, budget, target, make))
    if uniform:
        for i in uniform_indices(space, uniform):
            out.append(Entry(f"uniform:{i}", None, (1.0, 1.0, 1.0), lambda i=i: build_source(f"uniform:{i}")))
    return out


def load_contexts(cfg: EvalConfig, split: str, n: int, vocab_size: int) -> Tensor:
    """A seeded sample of `n` contexts of the corpus split (corpus 'random': random tokens, for tests)."""
    from training.grpo import corpus_contexts

    if cfg.corpus == "random":
        return corpus_contexts(cfg.model, cfg.corpus, split, cfg.context_length, vocab_size, cfg.seed, max_contexts=n)
    pool = corpus_contexts(cfg.model, cfg.corpus, split, cfg.context_length, vocab_size, cfg.seed)
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))[:n]
    return pool[pick]


# -- perplexity -------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_ppl(sol, contexts: Tensor, entries: list[Entry], horizon: int, max_rows: int = 160, seed: int = 0,
                 on_progress: Callable[[int], None] | None = None, resume: dict | None = None,
                 on_chunk: Callable[[dict], None] | None = None) -> tuple[Tensor, Tensor]:
    """(per-context mean log-lik [C, E], per-context realized budget [C, E, 3]) of every entry, all
    entries side by side in one shared-prefill rollout per chunk of contexts. After every chunk
    `on_chunk` gets the state so far ({"done", "ll", "budget", "gen"}); `resume` (such a state) continues
    from it, with the same results as a run that was never stopped."""
    E, C = len(entries), contexts.shape[0]
    per_chunk = max(1, max_rows // E)
    ll = torch.zeros(C, E, dtype=torch.float64)
    budget = torch.zeros(C, E, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    start = 0
    if resume is not None:
        start = resume["done"]
        ll[:start], budget[:start] = resume["ll"], resume["budget"]
        gen.set_state(resume["gen"])
    for lo in range(start, C, per_chunk):
        ctx = contexts[lo : lo + per_chunk]
        c = ctx.shape[0]
        targets = torch.tensor([e.target for e in entries], dtype=torch.float64).repeat(c, 1)
        ep = rollout(sol, ctx, Composite([e.make() for e in entries]), targets, group=E, horizon=horizon, generator=gen)
        ll[lo : lo + c] = ep.mean_logp().double().view(c, E).cpu()
        budget[lo : lo + c] = ep.budget.view(c, E, 3)
        if on_chunk is not None:
            on_chunk({"done": lo + c, "ll": ll[:lo + c].clone(), "budget": budget[:lo + c].clone(), "gen": gen.get_state()})
        if on_progress is not None:
            on_progress(c)
    return ll, budget


def _row(space, eval_name, entry: Entry, budget: Tensor, metric: str, value: float, n: int, extra=None) -> dict:
    b = {axis: float(budget[i]) for i, axis in enumerate(AXES)}
    row = {
        "eval": eval_name, "method": entry.method, "budget": _budget_label(entry.budget),
        **{f"target_{a}": (entry.target[i] if entry.budget is not None else "") for i, a in enumerate(AXES)},
        **b, "net_keep": sum(b[a] for a in space.axes) / len(space.axes), "metric": metric, "value": value, "n": n,
    }
    row.update(extra or {})
    return row


# -- the whole run ----------------------------------------------------------------------------------
def build(cfg: EvalConfig, policy=None):
    """(sol, policy, tokenizer) for the config: the base model compiled for the policy's action space
    (`policy`: cfg.policy already loaded, else it is loaded here)."""
    import solc
    from solc.models import load_compiled

    if policy is None and cfg.policy:
        policy = load_policy(cfg.policy)
    device = resolve_device(cfg.device, argument="--device")
    kwargs = {}
    if policy is not None:
        kwargs = {"actions": list(policy.space.axes), "levels": {a: list(v) for a, v in policy.space.levels.items()},
                  "quant": policy.space.quant}
    sol = load_compiled(cfg.model, dtype=resolve_dtype(cfg.dtype), device=device, **kwargs)
    if cfg.context_length > sol.max_seq_len:
        raise ArgumentError("--context-length", f"--context-length {cfg.context_length} is invalid: --model {cfg.model} "
                                                f"holds at most {sol.max_seq_len} positions")
    if policy is not None and policy.config.d_base != sol.token_embedding.shape[1]:
        raise ArgumentError("--policy", f"--policy {cfg.policy} was trained on a model of hidden size "
                                        f"{policy.config.d_base}, --model {cfg.model} has {sol.token_embedding.shape[1]}: "
                                        "evaluate it with the model it was trained on")
    if policy is not None:
        policy = policy.to(device=device, dtype=torch.float64 if cfg.dtype == "float64" else torch.float32).eval()
    tokenizer = solc.load_tokenizer(cfg.model) if cfg.corpus != "random" else None
    return sol, policy, tokenizer


def _fingerprint(cfg: EvalConfig, sol, policy) -> str:
    """What an evaluation's results depend on: the options (not where it writes or how it shows
    progress), the model's embedding and the policy's weights."""
    options = sorted((k, v) for k, v in vars(cfg).items() if k not in ("out", "progress", "threads", "overwrite"))
    return fingerprint(options, [sol.token_embedding] + (list(policy.state_dict().values()) if policy is not None else []))


def run(cfg: EvalConfig, sol=None, policy=None, tokenizer=None, progress_file: Path | None = None,
        finish: bool = True) -> dict:
    """Run the evaluation; returns {"rows": [...], "ppl": {...}, "search": {...}}. Writes nothing but
    `progress_file` (the finished parts, for a rerun after an interrupt; removed at the end, or with
    finish=False left for the caller to remove once it has written the results)."""
    from tqdm.auto import tqdm

    from training import mc

    if sol is None:
        sol, policy, tokenizer = build(cfg)
    space = sol.space
    saved = ProgressFile(Path(progress_file) if progress_file is not None else None,
                         _fingerprint(cfg, sol, policy) if progress_file is not None else "", "--out", "evaluate")
    methods = [m for m in cfg.methods if m != "policy" or policy is not None]
    check_actions(space, cfg)
    tasks = load_tasks(cfg)
    need_search = "random-search" in methods
    matched = "policy" in methods and cfg.matched_draws > 0 and cfg.test_contexts > 0
    total = ((cfg.val_contexts if need_search else 0) + cfg.test_contexts * (2 if matched else 1)
             + sum(len(t.questions) for t in tasks))
    bar = tqdm(total=total, desc="evaluate", unit="item", disable=not cfg.progress, dynamic_ncols=True)
    vocab = sol.token_embedding.shape[0]
    out: dict = {"rows": []}

    searched = None
    if need_search:
        bar.set_postfix_str("random search (validation)")
        found = saved.get("search")
        if found is None:
            val = load_contexts(cfg, "validation", cfg.val_contexts, vocab)
            searched = random_search(sol, val, [axis_targets(space, b) for b in cfg.budgets], n=cfg.search_n,
                                     horizon=cfg.horizon, seed=cfg.seed, max_rows=cfg.max_rows, on_progress=bar.update)
            saved.put("search", [(list(k), list(r.target), r.schedules, r.scores, r.best) for k, r in searched.items()])
        else:
            searched = {tuple(k): SearchResult(tuple(t), sch, sc, best) for k, t, sch, sc, best in found}
            bar.update(cfg.val_contexts)
        out["search"] = {k: {"best": r.best, "val_loglik": r.scores.tolist(), "schedule": r.schedule.tolist()} for k, r in searched.items()}

    if cfg.test_contexts > 0:  # 0: multiple choice only
        bar.set_postfix_str("perplexity (test)")
        entries = make_entries(space, methods, cfg.budgets, policy, searched, cfg.greedy, uniform=cfg.uniform)
        test = load_contexts(cfg, "test", cfg.test_contexts, vocab)
        resume = saved.get("ppl")
        if resume is not None:
            bar.update(resume["done"])
        ll, budget = evaluate_ppl(sol, test, entries, cfg.horizon, cfg.max_rows, cfg.seed, on_progress=bar.update,
                                  resume=resume, on_chunk=lambda state: saved.put("ppl", state))
        pol = [j for j, e in enumerate(entries) if e.method == "policy"]
        if pol and matched:
            bar.set_postfix_str("fixed/random at the policy's realized budgets")
            done = saved.get("matched")
            if done is None:
                base = matched_baselines(sol, test, budget[:, pol], cfg.horizon, cfg.matched_draws, cfg.seed,
                                         cfg.max_rows, on_progress=bar.update)
                saved.put("matched", [base.fixed_loglik, base.random_loglik, base.fixed_budget, base.random_budget])
            else:
                base = MatchedBaselines(*done)
                bar.update(cfg.test_contexts)
            for name, b_ll, b_budget in (("fixed@policy", base.fixed_loglik, base.fixed_budget),
                                          ("random@policy", base.random_loglik, base.random_budget)):
                entries += [Entry(name, entries[j].budget, entries[j].target, None) for j in pol]
                ll = torch.cat([ll, b_ll], dim=1)
                budget = torch.cat([budget, b_budget], dim=1)
        out["ppl"] = {"entries": entries, "loglik": ll, "budget": budget}
        for j, e in enumerate(entries):
            mean_ll = float(ll[:, j].mean())
            out["rows"].append(_row(space, "ppl", e, budget[:, j].mean(0), "ppl", math.exp(-mean_ll), test.shape[0],
                                    {"mean_loglik": mean_ll}))

    mc_methods = [m for m in (cfg.mc_methods or methods) if m in methods or m.startswith("uniform:")]
    mc_entries = make_entries(space, mc_methods, cfg.budgets, policy, searched, cfg.greedy)
    dense = f"uniform:{space.dense_index}"
    mc_entries.append(Entry(dense, None, (1.0, 1.0, 1.0), lambda: build_source(dense)))
    gen = torch.Generator().manual_seed(cfg.seed)
    done = saved.get("mc") or {"tasks": 0, "rows": []}
    if done["tasks"]:
        gen.set_state(done["gen"])
        out["rows"] += done["rows"]
        bar.update(sum(len(t.questions) for t in tasks[:done["tasks"]]))
    for i, task in enumerate(tasks[done["tasks"]:], start=done["tasks"]):
        bar.set_postfix_str(task.name)
        names = [f"{e.method}@{_budget_label(e.budget)}" for e in mc_entries]
        res = mc.score_task(sol, tokenizer, task, {n: (e.make, e.target) for n, e in zip(names, mc_entries)},
                            generator=gen, on_question=bar.update, tail=cfg.mc_tail)
        rows = []
        for n, e in zip(names, mc_entries):
            r = res[n]
            b = torch.tensor([r.budget[a] for a in AXES], dtype=torch.float64)
            rows.append(_row(space, task.name, e, b, "acc", r.accuracy, len(task.questions),
                             {"chance": task.chance, "correct": sum(r.correct)}))
        out["rows"] += rows
        done = {"tasks": i + 1, "rows": done["rows"] + rows, "gen": gen.get_state()}
        saved.put("mc", done)
    bar.close()
    if finish:
        saved.finish()
    return out


# -- outputs ----------------------------------------------------------------------------------------
CSV_FIELDS = ["eval", "method", "budget", "target_attn", "target_mlp", "target_quant", "attn", "mlp", "quant",
              "net_keep", "metric", "value", "n", "mean_loglik", "chance", "correct"]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _front(points: list[tuple[float, float]], higher_better: bool) -> list[tuple[float, float]]:
    """The Pareto-optimal points (less net keep, better quality), sorted by net keep."""
    pts = sorted(points)
    out, best = [], -math.inf
    for x, y in pts:
        q = y if higher_better else -y
        if q > best:
            out.append((x, y))
            best = q
    return out


STYLE = {"policy": ("tab:red", "o"), "fixed": ("tab:blue", "s"), "random": ("tab:green", "^"), "random-search": ("tab:purple", "D"),
         "fixed@policy": ("tab:cyan", "s"), "random@policy": ("tab:olive", "^")}


def plot_pareto(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = list(dict.fromkeys(r["eval"] for r in rows))
    cols = min(3, len(evals))
    nrows = math.ceil(len(evals) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
    for ax, ev in zip(axes.flat, evals):
        sub = [r for r in rows if r["eval"] == ev]
        ppl = sub[0]["metric"] == "ppl"
        uni = [r for r in sub if r["method"].startswith("uniform:")]
        if uni:
            xs, ys = [r["net_keep"] for r in uni], [r["value"] for r in uni]
            ax.scatter(xs, ys, s=12, c="0.6", label="uniform actions", zorder=1)
            front = _front(list(zip(xs, ys)), higher_better=not ppl)
            if len(front) > 1:
                ax.plot(*zip(*front), c="0.6", lw=1, ls="--", zorder=1)
        for m in dict.fromkeys(r["method"] for r in sub if not r["method"].startswith("uniform:")):
            pts = sorted((r["net_keep"], r["value"]) for r in sub if r["method"] == m)
            color, marker = STYLE.get(m, (None, "x"))
            ax.plot(*zip(*pts), marker=marker, color=color, label=m, lw=1.5, ms=4, zorder=2)
        if ppl:
            ax.set_yscale("log")
            ax.set_ylabel("perplexity (lower is better)")
        else:
            ax.axhline(sub[0].get("chance", float("nan")), color="k", lw=0.8, ls=":", label="chance")
            ax.set_ylabel("accuracy")
        ax.set_xlabel("realized net keep")
        ax.set_title(ev, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(evals):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tensorboard(rows: list[dict], logdir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as w:
        for r in rows:
            step = int(round(100 * r["net_keep"])) if r["budget"] == "" else _budget_step(tuple(r[f"target_{a}"] for a in AXES))
            tag = f"{r['eval']}/{r['method']}"
            w.add_scalar(f"{tag}/{r['metric']}", r["value"], step)
            w.add_scalar(f"{tag}/net_keep", r["net_keep"], step)
            for a in AXES:
                w.add_scalar(f"{tag}/budget_{a}", r[a], step)


def _paired(result: dict, a: str, b: str) -> dict[str, tuple[float, float]]:
    """Per budget label: mean and standard error over test contexts of loglik(a) - loglik(b)."""
    entries, ll = result["ppl"]["entries"], result["ppl"]["loglik"]
    idx = {(e.method, _budget_label(e.budget)): j for j, e in enumerate(entries)}
    out = {}
    for (m, lab), j in idx.items():
        if m == a and (b, lab) in idx:
            d = ll[:, j] - ll[:, idx[(b, lab)]]
            se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else float("nan")
            out[lab] = (float(d.mean()), se)
    return out


def report(result: dict, cfg: EvalConfig, command: str) -> str:
    rows = result["rows"]
    budgets = [_budget_label(b) for b in cfg.budgets]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["budget"] != ""))
    lines = [f"Command: `{command}`", ""]
    if "ppl" in result:
        lines += [f"## Perplexity, test split ({cfg.test_contexts} contexts x {cfg.horizon} controlled steps; cell: ppl (realized net keep))", ""]
        lines += ["| method | " + " | ".join(budgets) + " |", "|---|" + "---:|" * len(budgets)]
        for m in methods:
            cells = []
            for lab in budgets:
                r = next((r for r in rows if r["eval"] == "ppl" and r["method"] == m and r["budget"] == lab), None)
                cells.append(f"{r['value']:.2f} ({r['net_keep']:.3f})" if r else "")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        uni = sorted((r for r in rows if r["eval"] == "ppl" and r["budget"] == ""), key=lambda r: r["net_keep"])
        dense = next((r for r in uni if r["net_keep"] == 1.0), None)
        if dense:
            lines += ["", f"Dense (every step at attn 1.0, mlp 1.0, 16 bit) on the same contexts: ppl {dense['value']:.2f}"]
        if len(uni) > 1:
            front = _front([(r["net_keep"], r["value"]) for r in uni], higher_better=False)
            lines += ["", "Uniform actions on the Pareto front (net keep: ppl): " + ", ".join(f"{x:.3f}: {y:.2f}" for x, y in front)]
        for base in ("fixed", "random", "random-search", "fixed@policy", "random@policy"):
            d = _paired(result, "policy", base)
            if d:
                lines += ["", f"policy - {base}, mean log-lik per token over the test contexts (+ = policy better), mean (stderr): "
                          + ", ".join(f"{lab}: {m:+.4f} ({s:.4f})" for lab, (m, s) in d.items())]
    mc_evals = [e for e in dict.fromkeys(r["eval"] for r in rows) if e != "ppl"]
    if mc_evals:
        lines += ["", "## Multiple-choice accuracy (cell: accuracy (realized net keep on the continuation steps))", ""]
        for ev in mc_evals:
            sub = [r for r in rows if r["eval"] == ev]
            dense = next((r for r in sub if r["budget"] == ""), None)
            head = f"### {ev}: {sub[0]['n']} questions, chance {sub[0]['chance']:.3f}"
            if dense:
                head += f", dense {dense['value']:.3f}"
            lines += [head, "", "| method | " + " | ".join(budgets) + " |", "|---|" + "---:|" * len(budgets)]
            for m in [m for m in methods if any(r["method"] == m for r in sub)]:
                cells = []
                for lab in budgets:
                    r = next((r for r in sub if r["method"] == m and r["budget"] == lab), None)
                    cells.append(f"{r['value']:.3f} ({r['net_keep']:.3f})" if r else "")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Budget adherence of the policy (requested -> realized per axis; attn keep, mlp keep, bits/16)", ""]
    lines += ["| eval | budget | attn | mlp | bits/16 | net keep | max abs error |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["method"] == "policy":
            cells, errs = [], []
            for a in AXES:
                cells.append(f"{r[f'target_{a}']:.3f} -> {r[a]:.3f}")
                errs.append(abs(r[a] - r[f"target_{a}"]))
            lines.append(f"| {r['eval']} | {r['budget']} | " + " | ".join(cells) + f" | {r['net_keep']:.3f} | {max(errs):.3f} |")
    if "ppl" in result:
        ll_entries, bud = result["ppl"]["entries"], result["ppl"]["budget"]
        worst = [float((bud[:, j] - torch.tensor(e.target)).abs().max()) for j, e in enumerate(ll_entries) if e.method == "policy"]
        if worst:
            lines += ["", f"Largest per-episode, per-axis deviation of the policy on the perplexity episodes: {max(worst):.3f}"]
    return "\n".join(lines) + "\n"


def _parse_budgets(text: str) -> list:
    out = []
    for part in text.split(","):
        try:
            vals = [float(x) for x in part.split("/")]
        except ValueError:
            _bad("budgets", text, "comma-separated budgets, each a number in (0, 1] or attn/mlp/bits16, e.g. 0.5,0.6/0.8/0.5")
        out.append(check_budget_value(vals[0] if len(vals) == 1 else tuple(vals)))
    return out


def _parse_ints(flag: str, text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ArgumentError(flag, f"{flag} {text!r} is invalid: comma-separated ints, e.g. 0,3") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = EvalConfig(policy="")  # the defaults
    p.add_argument("--policy", required=True, help="policy.pt written by training.grpo ('' to evaluate the baselines only)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--corpus", default=d.corpus, help="perplexity corpus ('random': random tokens, for tests)")
    p.add_argument("--budgets", default="0.4,0.5,0.6,0.7,0.8", help="comma-separated; each one number or attn/mlp/bits16")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="any of policy, fixed, random, random-search, uniform:<i>")
    p.add_argument("--uniform", default="all", help="perplexity of uniform actions: all | dense | none | indices 0,13,26")
    p.add_argument("--context-length", type=int, default=d.context_length)
    p.add_argument("--horizon", type=int, default=d.horizon)
    p.add_argument("--test-contexts", type=int, default=d.test_contexts, help="test-split contexts for perplexity (0: skip perplexity)")
    p.add_argument("--val-contexts", type=int, default=d.val_contexts, help="validation contexts random search selects on")
    p.add_argument("--search-n", type=int, default=d.search_n, help="random search: candidates per budget")
    p.add_argument("--mc-tasks", default=None, help="bigbench:<task> / mmlu:<file>, comma-separated ('' for none; default: "
                                                     f"{','.join(DEFAULT_MC_TASKS)}, none for a cost-budget policy)")
    p.add_argument("--mc-shots", default="0,3", help="comma-separated shot counts")
    p.add_argument("--mc-questions", type=int, default=d.mc_questions, help="questions per task (a seeded sample)")
    p.add_argument("--mc-tail", type=int, default=d.mc_tail,
                   help="prompt tokens before the answer that also run under the method's actions (counted in the budget, not scored); "
                        "0 = only the answer tokens, where a one-token answer cannot realize a budget between two levels")
    p.add_argument("--mc-methods", default="", help="methods scored on multiple choice (default: --methods)")
    p.add_argument("--max-rows", type=int, default=d.max_rows, help="rows per batched rollout (bounds the KV cache memory)")
    p.add_argument("--matched-draws", type=int, default=d.matched_draws,
                   help="Random draws per test context for random@policy (Fixed/Random at the policy's realized budget); 0 = skip")
    p.add_argument("--sample", action="store_true", help="sample the policy at its temperature instead of argmax")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES), help="base model dtype")
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=d.out, help="where the results go (not a training run's directory)")
    p.add_argument("--overwrite", action="store_true", help="replace another evaluation that --out holds")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    ctrl_c_raises()  # torch has loaded: Ctrl-C is a KeyboardInterrupt
    cfg = None
    try:
        cfg = config_from_args(argv)
        return _run_cli(cfg, argv)
    except SolcError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress = Path(cfg.out) / "progress.partial.pt" if cfg is not None else None
        kept = (f"the finished parts are kept in {progress}: the same command resumes there"
                if progress is not None and progress.is_file() else "nothing was finished yet")
        print(f"\nevaluate: interrupted; {kept}", file=sys.stderr)
        return 130
    except OSError as e:  # --out full or read-only
        print(f"evaluate: error: cannot write to --out {cfg.out if cfg is not None else ''}: {e}", file=sys.stderr)
        return 1


def config_from_args(argv=None) -> EvalConfig:
    """The EvalConfig of command-line words (every value checked; argparse exits on a malformed flag)."""
    if argv is not None and (isinstance(argv, str) or not all(isinstance(a, str) for a in argv)):
        raise ArgumentTypeError("argv", f"argv={argv!r} is invalid: a list of strings (command-line words)")
    args = _parser().parse_args(argv)
    if args.mc_tasks is None:  # multiple choice is not wired for a cost-budget policy: none by default there
        # (a missing policy file is the run's error to report, not the parser's)
        cost = bool(args.policy) and Path(args.policy).is_file() and load_policy(args.policy).config.budget_spec.is_cost
        args.mc_tasks = "" if cost else ",".join(DEFAULT_MC_TASKS)
    return EvalConfig(
        policy=args.policy, model=args.model, corpus=args.corpus, budgets=_parse_budgets(args.budgets),
        methods=[m.strip() for m in args.methods.split(",") if m.strip()], uniform=args.uniform,
        context_length=args.context_length, horizon=args.horizon, test_contexts=args.test_contexts,
        val_contexts=args.val_contexts, search_n=args.search_n,
        mc_tasks=[t.strip() for t in args.mc_tasks.split(",") if t.strip()],
        mc_shots=_parse_ints("--mc-shots", args.mc_shots), mc_questions=args.mc_questions, mc_tail=args.mc_tail,
        mc_methods=[m.strip() for m in args.mc_methods.split(",") if m.strip()] or None,
        max_rows=args.max_rows, matched_draws=args.matched_draws, greedy=not args.sample, seed=args.seed, dtype=args.dtype, device=args.device,
        out=args.out, threads=args.threads, progress=not args.no_progress, overwrite=args.overwrite,
    )


EVAL_FILES = ("results.csv", "results.json", "pareto.png", "report.md", "command.txt", "tb", "progress.partial.pt")


def _recorded(out: Path) -> str | None:
    """The command an evaluation in `out` recorded (its command.txt), None without one."""
    return (out / "command.txt").read_text().strip() if (out / "command.txt").is_file() else None


def _is_evaluation(recorded: str | None) -> bool:
    return recorded is not None and recorded.split()[:3] == ["python", "-m", "training.evaluate"]


def claim_out(cfg: EvalConfig, command: str) -> Path:
    """--out for this evaluation: never a training run's directory; another evaluation's (its command.txt
    records another training.evaluate command) only with --overwrite, which removes that evaluation's
    files; files of these names that no evaluation wrote (no such command.txt) never. The same command
    resumes (progress.partial.pt) or repeats its own. Checks only; `start_out` writes."""
    out = Path(cfg.out)
    if os.path.lexists(out) and not out.is_dir():
        _bad("out", cfg.out, "a directory (this path is a file)")
    run = [n for n in ("config.json", "checkpoint.pt") if os.path.lexists(out / n)]
    if run:
        raise ArgumentError("--out", f"--out {cfg.out} holds a training run ({', '.join(run)}): write the evaluation "
                                     "to another --out")
    held = [n for n in EVAL_FILES if n != "progress.partial.pt" and os.path.lexists(out / n)]
    recorded = _recorded(out)
    if held and recorded != command and not _is_evaluation(recorded):
        raise ArgumentError("--out", f"--out {cfg.out} holds {', '.join(held)}, which no evaluation wrote (no command.txt "
                                     "of python -m training.evaluate): they are not replaced, not even with "
                                     "--overwrite; move them away or choose another --out")
    if held and recorded != command and not cfg.overwrite:
        what = f"recorded command: {recorded}" if recorded else ", ".join(held)
        raise ArgumentError("--out", f"--out {cfg.out} holds another evaluation ({what}): pass --overwrite to replace "
                                     "it, or another --out")
    return out


def start_out(cfg: EvalConfig, out: Path, command: str) -> None:
    """Make --out this evaluation's: --overwrite clears another's files; command.txt names the command."""
    recorded = _recorded(out)
    if cfg.overwrite and recorded != command and _is_evaluation(recorded):  # claim_out refused anything else
        for name in EVAL_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(command + "\n")


def check_cost_options(cfg: EvalConfig) -> None:
    """What the cost path (training.cost_eval's comparison) cannot do is refused, not ignored."""
    if cfg.mc_tasks:
        raise ArgumentError("--mc-tasks", f"--mc-tasks {','.join(cfg.mc_tasks)}: multiple choice is not wired for "
                                          "cost-budget policies yet; leave --mc-tasks out (none is the default for them)")
    if cfg.test_contexts < 1:
        raise ArgumentError("--test-contexts", f"--test-contexts {cfg.test_contexts} is invalid: a cost-budget policy "
                                               "is evaluated on perplexity contexts: an int >= 1")
    triples = [b for b in cfg.budgets if isinstance(b, tuple)]
    if triples:
        raise ArgumentError("--budgets", f"--budgets {'/'.join(f'{x:g}' for x in triples[0])} is invalid for a "
                                         "cost-budget policy: each budget is one cost fraction, e.g. 0.6")
    if not cfg.greedy:
        raise ArgumentError("--sample", "--sample: a cost-budget policy is evaluated greedily (as deployed); "
                                        "sampling is not wired for it")
    if cfg.uniform != "all":
        raise ArgumentError("--uniform", f"--uniform {cfg.uniform}: not used for a cost-budget policy (every uniform "
                                         "action is scored for the best-static hull, and the named reference actions "
                                         "are reported); leave --uniform out")
    for name, methods in (("methods", cfg.methods), ("mc_methods", cfg.mc_methods or [])):
        odd = [m for m in methods if m not in DEFAULT_METHODS]
        if odd or (name == "methods" and not {"policy", "fixed"} <= set(methods)) or (name == "mc_methods" and methods):
            raise ArgumentError(_flag(name), f"{_flag(name)} {','.join(methods)} is invalid for a cost-budget policy: "
                                             "--methods must hold policy and fixed (the best static mix runs too), "
                                             "may add random and random-search; --mc-methods does not apply")


def _run_cost_cli(cfg: EvalConfig, command: str, policy) -> int:
    """A cost-budget policy: each budget is a cost fraction, and the comparison is training.cost_eval's
    (best static hull mix, Fixed and Random at each episode's realized cost, paired per context; with
    "random-search" among the methods, the best of --search-n schedules at the policy's mean cost)."""
    from training import cost_eval

    check_cost_options(cfg)
    out = claim_out(cfg, command)
    t0 = time.perf_counter()
    sol, policy, _ = build(cfg, policy)
    lo, hi = policy.config.budget_spec.feasible_range(sol.space)
    budgets = [float(b) for b in cfg.budgets]
    bad = [b for b in budgets if not lo - 1e-9 <= b <= hi + 1e-9]
    if bad:
        raise ArgumentError("--budgets", f"--budgets {','.join(f'{b:g}' for b in bad)} outside the feasible cost range "
                                         f"[{lo:.3f}, {hi:g}] of {cfg.policy} on --model {cfg.model}")
    vocab = sol.token_embedding.shape[0]
    test = load_contexts(cfg, "test", cfg.test_contexts, vocab)
    val = load_contexts(cfg, "validation", max(cfg.val_contexts, 1), vocab)
    search = cfg.search_n if "random-search" in cfg.methods else 0  # random search at a cost, on validation
    start_out(cfg, out, command)
    # an interrupted run keeps the contexts it finished there; the same command resumes from it
    result = cost_eval.evaluate(sol, [policy], test, val, budgets, cfg.horizon,
                                random_draws=cfg.matched_draws if "random" in cfg.methods else 0,
                                seed=cfg.seed, progress=cfg.progress, search=search,
                                progress_file=out / "progress.partial.pt", finish=False)
    text = (f"# Cost-budget evaluation\n\n{command}\n\nBudgets are cost fractions ({cfg.policy} was trained for a "
            f"cost budget); baselines run at each episode's realized cost (training.cost_eval).\n\n"
            + cost_eval.table(result))
    atomic_write_bytes(out / "report.md", (text + f"\n\n({time.perf_counter() - t0:.0f}s)\n").encode())
    write_json(out / "results.json", {"command": command, "result": result})
    (out / "progress.partial.pt").unlink(missing_ok=True)  # only now: an interrupt before keeps every context
    print(text)
    print(f"evaluate: wrote {out}/report.md, results.json, command.txt ({time.perf_counter() - t0:.0f}s)")
    return 0


def _run_cli(cfg: EvalConfig, argv) -> int:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    command = command_line("training.evaluate", argv)
    policy = load_policy(cfg.policy) if cfg.policy else None  # read once, for every use below
    if policy is not None and policy.config.budget_spec.is_cost:  # training.grpo's default
        return _run_cost_cli(cfg, command, policy)
    t0 = time.perf_counter()
    out = claim_out(cfg, command)
    # what can be checked without the model is, before it loads: the actions named (the policy's space, else
    # load_compiled's default one) and the multiple-choice files
    check_actions(policy.space if policy is not None else ActionSpace(quant="weight"), cfg)
    load_tasks(cfg)
    sol, policy, tokenizer = build(cfg, policy)
    start_out(cfg, out, command)
    # the same command resumes after an interrupt; the progress file goes once every output is written
    progress = out / "progress.partial.pt"
    result = run(cfg, sol, policy, tokenizer, progress_file=progress, finish=False)
    write_csv(result["rows"], out / "results.csv")
    plot_pareto(result["rows"], out / "pareto.png")
    shutil.rmtree(out / "tb", ignore_errors=True)  # this evaluation's, from an earlier run of the same command
    write_tensorboard(result["rows"], out / "tb")
    text = report(result, cfg, command)
    atomic_write_bytes(out / "report.md", (text + f"\n({time.perf_counter() - t0:.0f}s)\n").encode())
    progress.unlink(missing_ok=True)
    print(text)
    print(f"evaluate: wrote {out}/results.csv, pareto.png, report.md, command.txt, tb/ ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
