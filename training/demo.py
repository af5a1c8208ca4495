"""The project's main job on the built-in defaults (`make demo`), end to end on CPU in a few minutes:

1. load SmolLM2-135M and compile it with the default 27-action grid (attn x mlp x int4/int8/16-bit weights);
2. held-out perplexity (Shakespeare test split) dense and at two uniform actions;
3. train a policy briefly with GRPO (a few updates: a smoke run, not the 17-minute default run);
4. compare it against the best static mix, Fixed and Random at matched realized cost on held-out contexts;
5. export the compiled model + policy, load the artifact back, and generate text with the policy at
   budget 0.6, printing the realized budget computed from the actions that ran.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import solc
from runtime import validation
from runtime.errors import ArgumentError, SolcError
from runtime.policy import PolicySource
from solc.models import load_compiled
from runtime.schedulers import DENSE_PREFIX
from training import cost_eval
from training.compare_baselines import _table, compare
from training.cli import command_line
from training.grpo import GRPOConfig, load_training_contexts, train


@torch.no_grad()
def perplexity(sol, contexts: torch.Tensor, action: int) -> float:
    """Teacher-forced perplexity with `action` on every position >= DENSE_PREFIX (scored there only)."""
    total, count = 0.0, 0
    for ids in tqdm(contexts.split(1), desc=f"ppl {sol.space[action]}", leave=False):
        actions = torch.full_like(ids, action)
        actions[:, :DENSE_PREFIX] = sol.space.dense_index
        logits = sol(ids, actions).logits[:, DENSE_PREFIX - 1 : -1].float()
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, DENSE_PREFIX:], reduction="sum").item()
        count += ids[:, DENSE_PREFIX:].numel()
    return math.exp(total / count)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ppl-contexts", type=int, default=2, help="test windows of 512 tokens for perplexity")
    parser.add_argument("--updates", type=int, default=2, help="GRPO updates of the smoke training run")
    parser.add_argument("--eval-contexts", type=int, default=4, help="held-out contexts for the baseline comparison")
    parser.add_argument("--out", default="runs/demo", help="where the training run and the artifact go: a new or "
                        "empty folder, or one an earlier demo made (its grpo/ and artifact/ are replaced)")
    args = parser.parse_args(argv)
    try:
        for flag in ("ppl_contexts", "updates", "eval_contexts"):
            validation.check_int("--" + flag.replace("_", "-"), getattr(args, flag), 1)
        _run(args, argv)
    except SolcError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        sys.exit(2)


DEMO_MARK = ".solc-demo"  # in --out: the demo made this folder, so its grpo/ and artifact/ are the demo's own


def claim_out(out: Path) -> None:
    """The demo replaces OUT/grpo and OUT/artifact on every run: only in a folder that is new, empty or
    marked as the demo's, never in one that holds something else (a user's own training run, say: the
    default `training.grpo --out` is runs/grpo, which `--out runs` would have replaced)."""
    if os.path.lexists(out) and not out.is_dir():
        raise ArgumentError("--out", f"--out {out} is a file; the demo needs a folder of its own")
    if out.is_dir() and not (out / DEMO_MARK).is_file() and any(out.iterdir()):
        held = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise ArgumentError("--out", f"--out {out} already holds files the demo did not write ({held}); the demo "
                                     "replaces its own grpo/ and artifact/ on every run, so give it a new or empty "
                                     "folder (default runs/demo)")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).write_text("written by python -m training.demo; it replaces grpo/ and artifact/ here\n")


def _run(args, argv) -> None:
    command = command_line("training.demo", argv)
    start = time.time()
    out = Path(args.out)
    claim_out(out)  # before the model loads: a refusal costs nothing

    print("== 1. load and compile")
    sol, tokenizer = load_compiled(args.model, max_seq_len=512), solc.load_tokenizer(args.model)
    model = sol.base_model
    print(f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params; "
          f"{len(sol.info['attention_sites'])} attention + {len(sol.info['mlp_sites'])} MLP sites rewritten; "
          f"{len(sol.space)} actions")

    print(f"== 2. held-out perplexity ({args.ppl_contexts} x 512 test tokens, first {DENSE_PREFIX} dense)")
    contexts = solc.data.get_contexts(tokenizer, split="test", length=512, max_contexts=args.ppl_contexts)
    for action in (solc.Action(), solc.Action(attn=0.6, mlp=0.8, bits=8), solc.Action(attn=0.1, mlp=0.4, bits=4)):
        index = sol.space.index(action)
        print(f"  {str(action):40s} net keep {sol.space.net_keep(index):.3f}  ppl {perplexity(sol, contexts, index):8.2f}")

    print(f"== 3. GRPO smoke run ({args.updates} updates; the real default run is `python -m training.grpo`)")
    # the demo's own run directory: each demo replaces the previous demo's run
    cfg = GRPOConfig(model=args.model, out=str(out / "grpo"), max_updates=args.updates, checkpoint_every=args.updates,
                     overwrite=True)
    trainer = train(cfg, sol=sol)  # the model compiled in step 1 (512 positions cover the 256-token contexts)
    policy = trainer.policy.eval()

    pool = load_training_contexts(cfg, sol.token_embedding.shape[0], split="validation")
    held_out = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[: args.eval_contexts]]
    if policy.config.budget_spec.is_cost:  # the default: one cost fraction
        print(f"== 4. policy vs best static / Fixed / Random at matched realized cost ({args.eval_contexts} validation "
              "contexts, budget 0.6; the static hull is fitted on the same contexts)")
        result = cost_eval.evaluate(trainer.sol, [policy], held_out, held_out, [0.6], cfg.horizon, random_draws=1,
                                    progress=False)
        print(cost_eval.table(result))
    else:
        print(f"== 4. policy vs Fixed vs Random at matched realized budget ({args.eval_contexts} validation contexts, target 0.6)")
        print(_table(compare(trainer.sol, policy, held_out, 0.6, cfg.horizon, modes=("greedy",))))

    print("== 5. export, load back, generate with the policy at budget 0.6")
    path = solc.export(trainer.sol, policy, out / "artifact", tokenizer=tokenizer)
    sol2, policy2, tokenizer2 = solc.load(path)
    prompt = tokenizer2("ROMEO.\nBut soft, what light through yonder window breaks?\n", return_tensors="pt").input_ids
    gen = sol2.generate(prompt, policy=PolicySource(policy2, greedy=True), budget=0.6, max_new_tokens=40)
    dense = sol2.generate(prompt, max_new_tokens=40)  # the same prompt, every step dense: what the policy trades
    print("-- dense (every step):\n" + tokenizer2.decode(dense.tokens[0, prompt.shape[1]:]))
    print(f"-- the policy at budget 0.6 (after {args.updates} updates: a smoke run, not a trained policy):\n"
          + tokenizer2.decode(gen.tokens[0, prompt.shape[1]:]))
    print("realized budget: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in gen.budget.items()))
    print(f"\ndone in {time.time() - start:.0f}s; artifact in {path}; reproduce with: {command}")


if __name__ == "__main__":
    main()
