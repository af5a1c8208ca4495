"""Perplexity of the base model under each uniform action of the action grid (teacher-forced).

    python -m training.uniform_ppl --model smollm2-135m --max-contexts 4 --out docs/uniform_actions_weight
    python -m training.uniform_ppl --quant activation --out /tmp/uniform_actions_activation   # the paper's grid

Writes <out>.csv and <out>.md (a table with each action's net keep and the command that made it). An
existing <out>.csv or <out>.md that this tool did not write (docs/uniform_actions.md, which holds both
grids' tables and their notes, is one) is refused before the model loads, and left as it is.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm

import solc
from runtime import validation
from runtime.errors import ArgumentError
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


CSV_HEADER = "attn_keep,mlp_keep,bits,net_keep,ppl,tokens"


def _written_here(path: Path) -> bool:
    """Whether `path` is an earlier output of this tool: its CSV header, or its markdown's shape (the
    "Teacher-forced, ..." line and the command that made it)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix == ".csv":
        return lines[:1] == [CSV_HEADER]
    return (len(lines) > 4 and lines[0].startswith("# Perplexity under each uniform action (")
            and lines[2].startswith("Teacher-forced, ") and lines[4].startswith("    python -m training.uniform_ppl "))


def check_own_outputs(out: Path) -> None:
    for path in (out.with_suffix(".csv"), out.with_suffix(".md")):
        if os.path.lexists(path) and not _written_here(path):
            raise ArgumentError("--out", f"--out {out}: {path} exists and is not a table this tool wrote; it is left "
                                         "as it is: pass another --out")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.uniform_ppl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    try:  # before the model loads: a refusal costs nothing
        validation.check_int("--dense-prefix", args.dense_prefix, 0)
        validation.check_int("--length", args.length, args.dense_prefix + 2, why="two positions past --dense-prefix at least")
        validation.check_int("--max-contexts", args.max_contexts, 1)
        validation.check_int("--batch", args.batch, 1)
        check_own_outputs(Path(args.out))
    except ArgumentError as e:
        parser.error(str(e))

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
    writer = csv.DictWriter(table, fieldnames=CSV_HEADER.split(","))
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
