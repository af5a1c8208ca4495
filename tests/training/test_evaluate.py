"""python -m training.evaluate end to end on a tiny model: CSV, Pareto PNG, TensorBoard, report."""
import csv
import json
from types import SimpleNamespace

import pytest
import torch

import training.evaluate as evaluate
from runtime.policy import PolicyConfig, PolicyNet


class ByteTok:
    eos_token_id, bos_token_id = 0, None

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=list(text.encode()))


@pytest.fixture(scope="module")
def tiny_policy(tiny_sol, tmp_path_factory):
    torch.manual_seed(0)
    policy = PolicyNet(PolicyConfig.for_model(tiny_sol, d_model=32, n_heads=2))
    path = tmp_path_factory.mktemp("policy") / "policy.pt"
    policy.save(path)
    return policy, path


def test_cli_writes_csv_plot_tensorboard_and_report(tiny_policy, tmp_path):
    _, path = tiny_policy
    out = tmp_path / "eval"
    rc = evaluate.main([
        "--policy", str(path), "--model", "tiny-llama", "--corpus", "random", "--budgets", "0.5,0.7",
        "--context-length", "26", "--test-contexts", "2", "--val-contexts", "1", "--search-n", "3",
        "--uniform", "0,dense", "--mc-tasks", "", "--out", str(out), "--no-progress",
    ])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    methods = {(r["method"], r["budget"]) for r in rows}
    for m in ("policy", "fixed", "random", "random-search"):
        assert {(m, "0.5"), (m, "0.7")} <= methods
    assert {r["method"] for r in rows if r["method"].startswith("uniform:")} == {"uniform:0", "uniform:26"}
    for r in rows:
        assert r["eval"] == "ppl" and float(r["value"]) > 1 and 0 < float(r["net_keep"]) <= 1
        if r["method"] == "fixed":
            for a in ("attn", "mlp", "quant"):
                assert abs(float(r[a]) - float(r[f"target_{a}"])) <= 0.02
    # fixed@policy / random@policy: the baselines at the budget the policy realized on the same contexts
    for lab in ("0.5", "0.7"):
        pol = next(r for r in rows if r["method"] == "policy" and r["budget"] == lab)
        for m in ("fixed@policy", "random@policy"):
            r = next(r for r in rows if r["method"] == m and r["budget"] == lab)
            for a in ("attn", "mlp", "quant"):  # up to whole-step rounding per context (levels <= 0.5 apart, T=16)
                assert abs(float(r[a]) - float(pol[a])) <= 0.5 / 16 + 1e-6
    assert (out / "pareto.png").stat().st_size > 10_000
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    text = (out / "report.md").read_text()
    assert "Budget adherence of the policy" in text and "policy - fixed" in text and "| policy |" in text
    assert "policy - fixed@policy" in text and "| random@policy |" in text


def _mc_cache(tmp_path, monkeypatch):
    """A cache holding a 4-question BIG-bench task `t` and MMLU-format file `m` (SOLC_CACHE points at it)."""
    root = tmp_path / "cache"
    (root / "data" / "mc" / "bigbench").mkdir(parents=True)
    (root / "data" / "mc" / "mmlu").mkdir(parents=True)
    task = {"name": "t", "append_choices_to_input": False,
            "examples": [{"input": f"q{i}", "target_scores": {"yes": i % 2, "no": 1 - i % 2}} for i in range(4)]}
    (root / "data" / "mc" / "bigbench" / "t.json").write_text(json.dumps(task))
    rows = [{"question": f"Q{i}\nA. a\nB. b\nAnswer:", "answer": "AB"[i % 2]} for i in range(4)]
    (root / "data" / "mc" / "mmlu" / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setenv("SOLC_CACHE", str(root))


def test_run_with_multiple_choice(tiny_sol, tiny_policy, tmp_path, monkeypatch):
    policy, _ = tiny_policy
    _mc_cache(tmp_path, monkeypatch)
    cfg = evaluate.EvalConfig(policy="x", model="tiny-llama", corpus="random", budgets=[0.6], methods=["policy", "fixed", "random"],
                              uniform="none", context_length=26, test_contexts=0, mc_tasks=["bigbench:t", "mmlu:m"], mc_shots=[0, 1],
                              mc_questions=3, progress=False)
    result = evaluate.run(cfg, sol=tiny_sol, policy=policy, tokenizer=ByteTok())
    assert "ppl" not in result and all(r["eval"] != "ppl" for r in result["rows"])  # test_contexts=0: MC only
    mc_rows = result["rows"]
    assert {r["eval"] for r in mc_rows} == {"bigbench:t/0shot", "bigbench:t/1shot", "mmlu:m/0shot", "mmlu:m/1shot"}
    for r in mc_rows:
        assert r["n"] == 3 and 0 <= r["value"] <= 1 and r["chance"] == pytest.approx(0.5)
        if r["method"] == f"uniform:{tiny_sol.space.dense_index}":
            assert r["net_keep"] == pytest.approx(1.0)
    text = evaluate.report(result, cfg, "cmd")
    assert "### mmlu:m/1shot: 3 questions" in text and "## Perplexity" not in text
    evaluate.plot_pareto(result["rows"], tmp_path / "p.png")


def test_a_cost_budget_policy_is_compared_at_matched_cost(tiny_sol, tmp_path, capsys):
    from runtime.budget import BudgetSpec
    from runtime.cost_model import BytesCostModel

    spec = BudgetSpec.cost(BytesCostModel.for_model(tiny_sol), context=28)
    path = tmp_path / "cost_policy.pt"
    torch.manual_seed(0)
    PolicyNet(PolicyConfig.for_model(tiny_sol, d_model=32, n_heads=2, budget=spec)).save(path)
    out = tmp_path / "out"
    argv = ["--policy", str(path), "--model", "tiny-llama", "--corpus", "random", "--budgets", "0.8",
            "--context-length", "28", "--horizon", "6", "--test-contexts", "3", "--val-contexts", "2",
            "--matched-draws", "1", "--search-n", "2", "--mc-tasks", "", "--no-progress", "--out", str(out)]
    assert evaluate.main(argv) == 0
    res = json.loads((out / "results.json").read_text())["result"]
    (row,) = res["rows"]
    assert row["budget"] == 0.8 and row["policy"] == 0
    assert row["static_minus_policy"]["mean"] == pytest.approx(row["static_nll"] - row["policy_nll"], abs=1e-9)
    # random-search (a default method) runs at a cost: a fixed schedule of the horizon's length
    assert len(row["search_schedule"]) == 6
    assert row["search_minus_policy"]["mean"] == pytest.approx(row["search_nll"] - row["policy_nll"], abs=1e-9)
    assert "Budgets are cost fractions" in (out / "report.md").read_text()
    assert not (out / "progress.partial.pt").exists()  # the resumable progress is gone once the run completed
    assert evaluate.main(argv[:-1] + [str(tmp_path / "o2"), "--mc-tasks", "bigbench:x"]) == 2
    assert "--mc-tasks" in capsys.readouterr().err



def test_an_interrupted_evaluation_resumes_where_it_stopped(tiny_sol, tiny_policy, tmp_path, monkeypatch):
    """The finished parts (random search, each perplexity chunk, the matched baselines, each multiple-choice
    task) are saved as they finish; a rerun after an interrupt runs only what was left and gives the
    uninterrupted run's results; the progress file is gone at the end, and another evaluation's is not used."""
    from training import mc

    _mc_cache(tmp_path, monkeypatch)
    policy, _ = tiny_policy
    cfg = evaluate.EvalConfig(policy="x", model="tiny-llama", corpus="random", budgets=[0.6],
                              methods=["policy", "fixed", "random", "random-search"], uniform="dense",
                              context_length=26, test_contexts=4, val_contexts=1, search_n=2, matched_draws=1,
                              max_rows=10, mc_tasks=["bigbench:t", "mmlu:m"], mc_shots=[0], mc_questions=3,
                              progress=False)
    run = lambda **kw: evaluate.run(cfg, sol=tiny_sol, policy=policy, tokenizer=ByteTok(), **kw)  # noqa: E731
    whole = run()
    progress = tmp_path / "progress.partial.pt"
    calls, stop = {"rollout": 0, "task": 0}, {}
    real_rollout, real_task = evaluate.rollout, mc.score_task

    def counted(name, real):
        def call(*a, **k):
            calls[name] += 1
            if stop.get(name) == calls[name]:
                raise KeyboardInterrupt
            return real(*a, **k)
        return call
    monkeypatch.setattr(evaluate, "rollout", counted("rollout", real_rollout))
    monkeypatch.setattr(mc, "score_task", counted("task", real_task))

    stop["rollout"] = 2  # the perplexity's second chunk (5 entries x 2 contexts per chunk at max_rows 10)
    with pytest.raises(KeyboardInterrupt):
        run(progress_file=progress)
    assert torch.load(progress, weights_only=True)["ppl"]["done"] == 2
    stop.clear()
    stop["task"] = 2  # then the second multiple-choice task
    calls.update(rollout=0, task=0)
    with pytest.raises(KeyboardInterrupt):
        run(progress_file=progress)
    assert calls["rollout"] == 1  # only the perplexity's last chunk ran again
    assert torch.load(progress, weights_only=True)["mc"]["tasks"] == 1
    stop.clear()
    calls.update(rollout=0, task=0)
    resumed = run(progress_file=progress)
    assert calls == {"rollout": 0, "task": 1} and not progress.exists()
    assert resumed["rows"] == whole["rows"]
    assert torch.equal(resumed["ppl"]["loglik"], whole["ppl"]["loglik"])

    # another evaluation's progress is not used
    stop["task"] = 1
    calls.update(rollout=0, task=0)
    with pytest.raises(KeyboardInterrupt):
        run(progress_file=progress)
    stop.clear()
    calls.update(rollout=0, task=0)
    cfg.budgets = [0.7]
    other = run(progress_file=progress)
    assert calls["task"] == 2 and calls["rollout"] == 2 and {r["budget"] for r in other["rows"] if r["method"] == "fixed"} == {"0.7"}


def _tiny_argv(path, out, *extra):
    return ["--policy", str(path), "--model", "tiny-llama", "--corpus", "random", "--budgets", "0.6",
            "--context-length", "26", "--test-contexts", "2", "--val-contexts", "1", "--search-n", "2",
            "--uniform", "dense", "--mc-tasks", "", "--no-progress", "--out", str(out), *extra]


@pytest.mark.parametrize("extra, option, text", [
    (["--test-contexts", "0"], "--test-contexts", "nothing would be evaluated"),
    (["--policy", "", "--methods", "policy", "--uniform", "none"], "--methods", "at least one method"),
    (["--methods", "fixed,uniform:99"], "--methods", "action index in 0..26"),
    (["--mc-methods", "uniform:27"], "--mc-methods", "action index in 0..26"),
    (["--uniform", "0,99"], "--uniform", "outside 0..26"),
    (["--mc-tasks", "bigbench:missing"], "--mc-tasks", "missing.json is missing"),
    (["--budgets", "0.6,0.5,0.6/0.6/0.6"], "--budgets", "each budget once"),  # (before: duplicated results rows)
    (["--methods", "policy,fixed,fixed"], "--methods", "each method once"),
])
def test_bad_options_are_refused_in_one_line_before_the_model_loads(tiny_policy, tmp_path, monkeypatch, capsys,
                                                                    extra, option, text):
    """(Before: nothing to evaluate or an empty method list crashed with a ZeroDivisionError after the
    run; uniform:99 in --methods with a ValueError traceback mid-run; a missing task file and --uniform 99
    were reported only after the model had loaded.)"""
    _, path = tiny_policy
    monkeypatch.setenv("SOLC_CACHE", str(tmp_path / "cache"))  # no multiple-choice files there
    monkeypatch.setattr(evaluate, "build", lambda cfg: pytest.fail("the model loaded before the options were checked"))
    out = tmp_path / "out"
    assert evaluate.main(_tiny_argv(path, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"evaluate: error: {option}") and text in err and "\n" not in err
    assert not out.exists()


def test_an_interrupt_while_the_outputs_are_written_keeps_the_finished_results(tiny_policy, tmp_path, monkeypatch, capsys):
    """Ctrl-C after the evaluation finished but before report.md was written lost everything (the progress
    file was removed first, and the message said nothing was finished); now the progress stays until
    every output is written, and the same command then writes them without evaluating anything again."""
    _, path = tiny_policy
    ref = tmp_path / "ref"
    assert evaluate.main(_tiny_argv(path, ref)) == 0
    out = tmp_path / "out"
    real_plot = evaluate.plot_pareto

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "plot_pareto", interrupted)
    assert evaluate.main(_tiny_argv(path, out)) == 130
    assert "the same command resumes there" in capsys.readouterr().err
    assert (out / "progress.partial.pt").is_file() and not (out / "report.md").exists()
    monkeypatch.setattr(evaluate, "plot_pareto", real_plot)
    rollouts = []
    real_rollout = evaluate.rollout
    monkeypatch.setattr(evaluate, "rollout", lambda *a, **k: rollouts.append(1) or real_rollout(*a, **k))
    assert evaluate.main(_tiny_argv(path, out)) == 0
    assert rollouts == [] and not (out / "progress.partial.pt").exists()
    assert (out / "results.csv").read_text() == (ref / "results.csv").read_text()
    assert (out / "report.md").is_file() and (out / "pareto.png").is_file()


def test_overwrite_replaces_another_evaluation_but_never_files_no_evaluation_wrote(tiny_policy, tmp_path, capsys):
    """(Before: --overwrite deleted a user's report.md and tb/ folder in --out, calling them 'another
    evaluation', though no evaluation had written them.)"""
    _, path = tiny_policy
    out = tmp_path / "out"
    (out / "tb").mkdir(parents=True)
    (out / "report.md").write_text("my notes\n")
    (out / "tb" / "mine.txt").write_text("x\n")
    (out / "command.txt").write_text("make figures\n")
    for extra in ([], ["--overwrite"]):
        assert evaluate.main(_tiny_argv(path, out, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("evaluate: error: --out") and "no evaluation wrote" in err and "\n" not in err
        assert (out / "report.md").read_text() == "my notes\n" and (out / "tb" / "mine.txt").read_text() == "x\n"
        assert (out / "command.txt").read_text() == "make figures\n"
    # another evaluation (its command.txt records one) is replaced with --overwrite
    other = tmp_path / "other"
    assert evaluate.main(_tiny_argv(path, other)) == 0
    assert evaluate.main(_tiny_argv(path, other, "--budgets", "0.7")) == 2
    assert evaluate.main(_tiny_argv(path, other, "--budgets", "0.7", "--overwrite")) == 0
    assert "--budgets 0.7" in (other / "command.txt").read_text()
