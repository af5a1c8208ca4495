"""Perplexity of the base model under each uniform action of the action grid (teacher-forced).

    python -m training.uniform_ppl --model smollm2-135m --max-contexts 4 --out docs/uniform_actions_weight
    python -m training.uniform_ppl --quant activation --out docs/uniform_actions   # the paper's grid

Writes <out>.csv and <out>.md (a table with each action's net keep and the command that made it).
"""
from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path

import torch
from tqdm import tqdm

import solc
from solc.cache import atomic_write_bytes
from training.cli import command_line

DENSE_PREFIX = 7  # DESIGN: the first Ts+Tw+1 positions of an episode always run dense


@torch.no_grad()
def nll_under_action(sol, contexts: torch.Tensor, action: int, dense_prefix: int, batch: int) -> tuple[float, int]:
    """Summed next-token NLL over positions >= dense_prefix, and the number of tokens scored."""
    total, count = 0.0, 0
    for start in range(0, len(contexts), batch):
        ids = contexts[start : start + batch]
        actions = torch.full_like(ids, action)
        actions[:, :dense_prefix] = sol.space.dense_index
        logits = sol(ids, actions).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        total += nll[:, max(dense_prefix - 1, 0) :].sum().item()
        count += nll[:, max(dense_prefix - 1, 0) :].numel()
    return total, count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--split", default="test")
    parser.add_argument("--length", type=int, default=512, help="context window (tokens)")
    parser.add_argument("--max-contexts", type=int, default=4, help="windows scored (4 x 512 = 2048 tokens)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dense-prefix", type=int, default=DENSE_PREFIX, help="leading positions run dense")
    parser.add_argument("--quant", default="weight", choices=["weight", "activation"],
                        help="quant mode: weight (int8/int4 MLP weights, bits 4/8/16) or activation (the paper's, 5/7/16)")
    parser.add_argument("--out", default="docs/uniform_actions_weight", help="output path without extension")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = solc.load_model(args.model)
    tokenizer = solc.load_tokenizer(args.model)
    contexts = solc.data.get_contexts(tokenizer, corpus=args.corpus, split=args.split, length=args.length, max_contexts=args.max_contexts)
    sol = solc.compile(model, max_seq_len=args.length, quant=args.quant)
    rows = []
    for index in tqdm(range(len(sol.space)), desc="uniform actions"):
        total, count = nll_under_action(sol, contexts, index, args.dense_prefix, args.batch)
        action = sol.space[index]
        rows.append({
            "attn_keep": action.attn, "mlp_keep": action.mlp, "bits": action.bits,
            "net_keep": round(sol.space.net_keep(index), 4), "ppl": round(math.exp(total / count), 2), "tokens": count,
        })
    command = command_line("training.uniform_ppl", argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out.with_suffix(".csv"), table.getvalue().encode())  # an interrupt leaves the old file whole
    lines = [
        f"# Perplexity under each uniform action ({args.model}, {args.corpus} {args.split} split, quant={args.quant!r})",
        "",
        f"Teacher-forced, {len(contexts)} windows of {args.length} tokens; the first {args.dense_prefix} positions "
        "of each window run dense and are not scored. Made by:",
        "",
        f"    {command.strip()}",
        "",
        "| attn keep | mlp keep | bits | net keep | ppl |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['attn_keep']} | {r['mlp_keep']} | {r['bits']} | {r['net_keep']:.3f} | {r['ppl']:.2f} |" for r in rows]
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
