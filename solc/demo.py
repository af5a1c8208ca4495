"""The project's main job on the built-in defaults (`make demo`).

Today: load SmolLM2-135M, compile it with the 27-action grid, print held-out perplexity (dense and at a
few uniform actions) on the default corpus's test split, and generate text under a Fixed schedule at
net keep ~0.6 with its realized budget.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time

import torch
from tqdm import tqdm

import solc
from runtime.schedulers import DENSE_PREFIX


@torch.no_grad()
def perplexity(sol, contexts: torch.Tensor, action: int, batch: int = 2) -> float:
    """Teacher-forced perplexity with `action` on every position >= DENSE_PREFIX (scored there only)."""
    total, count = 0.0, 0
    for start in tqdm(range(0, len(contexts), batch), desc=f"ppl {sol.space[action]}", leave=False):
        ids = contexts[start : start + batch]
        actions = torch.full_like(ids, action)
        actions[:, :DENSE_PREFIX] = sol.space.dense_index
        logits = sol(ids, actions).logits[:, DENSE_PREFIX - 1 : -1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, DENSE_PREFIX:], reduction="sum")
        total, count = total + nll.item(), count + ids[:, DENSE_PREFIX:].numel()
    return math.exp(total / count)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m solc.demo", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-contexts", type=int, default=4, help="test windows scored (of --length tokens)")
    parser.add_argument("--length", type=int, default=512)
    args = parser.parse_args(argv)
    command = "python -m solc.demo " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))

    start = time.time()
    model = solc.load_model(args.model)
    tokenizer = solc.load_tokenizer(args.model)
    print(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params) in {time.time() - start:.1f}s")
    sol = solc.compile(model, max_seq_len=args.length)
    contexts = solc.data.get_contexts(tokenizer, split="test", length=args.length, max_contexts=args.max_contexts)
    print(f"held-out perplexity, shakespeare test split, {len(contexts)} x {args.length} tokens "
          f"(first {DENSE_PREFIX} positions dense, not scored):")
    for action in (solc.Action(), solc.Action(attn=0.6, mlp=0.8, bits=7), solc.Action(attn=0.1, mlp=0.4, bits=5)):
        index = sol.space.index(action)
        print(f"  {str(action):40s} net keep {sol.space.net_keep(index):.3f}  ppl {perplexity(sol, contexts, index):8.2f}")

    prompt = tokenizer("ROMEO.\nBut soft, what light through yonder window breaks?\n", return_tensors="pt").input_ids
    out = sol.generate(prompt, budget=0.6, max_new_tokens=40)
    text = tokenizer.decode(out.tokens[0, prompt.shape[1]:])
    print(f"\ngenerated under Fixed at budget 0.6 (realized: "
          + ", ".join(f"{k} {v:.3f}" for k, v in out.budget.items()) + f"):\n{text}\n")
    print(f"done in {time.time() - start:.0f}s; reproduce with: {command}")


if __name__ == "__main__":
    main()
