"""generate's sampling step (runtime/generate.py `_sample`) on SmolLM2-135M's own next-token logits: the
top-p mask in C (runtime/ops/cpu_sample.c) against the torch form that sorts the vocabulary, side by side.

    python benchmarks/sampling.py                     # batch 1 and 16, top-p 0.9 and 0.95, temperature 0.7 / 1.0

The logits are the model's at 128 positions of held-out Shakespeare (HF forward, fp32). Each round times
every configuration once with the C mask and once with the torch form (`_sample` with cpu_sample.top_p_
switched off), so drift hits both alike; medians over --rounds. Also reports the nucleus sizes, and how
many tokens the two masks put on different sides (fp32 rounding of a prefix mass at the boundary).
A second table (run first) times plain and top-k sampling with generate's sampler, which keeps its
[B, V] temporaries from step to step, against the one-shot form that makes them fresh, by turns.
Whether fresh temporaries fault in depends on the allocator's state (glibc raises its mmap and trim
thresholds once larger blocks were freed): measured first, the process is in the state a generate
call starts from.
Prints the tables and writes JSON (with the command) to --out.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.cost_model import device_name  # noqa: E402
from runtime.generate import _Sampler, _sample  # noqa: E402
from runtime.ops import cpu_sample  # noqa: E402
from solc.cache import atomic_write_bytes  # noqa: E402
from training.cli import check_result_path  # noqa: E402


def model_logits(positions: int) -> torch.Tensor:
    import solc
    from training.grpo import GRPOConfig, load_training_contexts

    model = solc.load_model("smollm2-135m")
    ids = load_training_contexts(GRPOConfig(context_length=2 * positions), 49152, split="test")[:1]
    with torch.no_grad():
        return model(ids).logits[0, positions:].float().contiguous()


def buffers_side_by_side(logits: torch.Tensor, batches: list[int], rounds: int) -> tuple[list[dict], str]:
    """Plain (temperature 0.8) and top-k 50 sampling steps: generate's sampler, whose [B, V] temporaries
    are kept from step to step, against the one-shot `_sample`, which makes them fresh, by turns."""
    configs = [(B, k) for B in batches for k in (None, 50)]
    times = {(c, form): [] for c in configs for form in ("held", "fresh")}
    held = {c: _Sampler(0.8, c[1], None, torch.Generator().manual_seed(0)) for c in configs}
    gen = torch.Generator().manual_seed(0)
    for r in range(rounds + 1):
        for c in configs:
            B, k = c
            rows = logits[(r * B) % (logits.shape[0] - B + 1):][:B]
            for form, run in (("held", held[c]), ("fresh", lambda x, k=k: _sample(x, 0.8, k, None, gen))):
                start = time.perf_counter()
                run(rows)
                if r:
                    times[(c, form)].append((time.perf_counter() - start) * 1e3)
    out = []
    lines = ["| batch | top-k | held ms | fresh ms | held / fresh |", "|---|---|---|---|---|"]
    for B, k in configs:
        h, f = (statistics.median(times[((B, k), form)]) for form in ("held", "fresh"))
        out.append({"batch": B, "top_k": k, "held_ms": h, "fresh_ms": f, "held_over_fresh": h / f})
        lines.append(f"| {B} | {k or '-'} | {h:.3f} | {f:.3f} | {h / f:.3f} |")
    return out, "\n".join(lines)


POSITIONS = 128  # logits rows: a batch takes that many of them at most


def _values(p: argparse.ArgumentParser, option: str, text: str, kind, valid, expected: str) -> list:
    """The comma-separated values of `option`, or a one-line p.error naming it, the value and what is valid."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(valid(v) for v in values):
        p.error(f"{option}={text} is invalid: expected {expected}")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--top-p", default="0.9,0.95")
    p.add_argument("--temperatures", default="0.7,1.0")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sampling_cpu.json"))
    args = p.parse_args(argv)
    batches = _values(p, "--batches", args.batches, int, lambda b: 1 <= b <= POSITIONS,
                      f"comma-separated integers in 1..{POSITIONS} (the logits' positions)")
    top_ps = _values(p, "--top-p", args.top_p, float, lambda v: 0 < v <= 1, "comma-separated numbers in (0, 1]")
    temperatures = _values(p, "--temperatures", args.temperatures, float, lambda v: 0 < v < float("inf"),
                           "comma-separated numbers > 0 (0 is greedy: no top-p mask to time)")
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds} is invalid: expected an integer >= 1")
    if args.threads < 1:
        p.error(f"--threads={args.threads} is invalid: expected an integer >= 1")
    check_result_path(p, args.out, "python benchmarks/sampling.py", "--out")
    torch.set_num_threads(args.threads)
    logits = model_logits(POSITIONS)
    # first: fresh temporaries fault in or not with the allocator's state, which the top-p runs change
    buffer_rows, buffer_table = buffers_side_by_side(logits, batches, args.rounds)
    configs = [(b, tp, t) for b in batches for tp in top_ps for t in temperatures]
    times = {(c, form): [] for c in configs for form in ("C", "torch")}
    gen = torch.Generator().manual_seed(0)
    real = cpu_sample.top_p_
    for r in range(args.rounds + 1):
        for c in configs:
            B, tp, temp = c
            rows = logits[(r * B) % (logits.shape[0] - B + 1):][:B]
            for form in ("C", "torch"):
                cpu_sample.top_p_ = real if form == "C" else (lambda *a: False)
                start = time.perf_counter()
                _sample(rows, temp, None, tp, gen)
                if r:
                    times[(c, form)].append((time.perf_counter() - start) * 1e3)
    cpu_sample.top_p_ = real

    results = []
    for B, tp, temp in configs:
        scaled = logits / temp
        c_mask = scaled.clone()
        real(c_mask, tp)
        t_mask = scaled.clone()
        cpu_sample.top_p_torch_(t_mask, tp)
        sizes = (c_mask > float("-inf")).sum(-1).float()
        c_ms, t_ms = (statistics.median(times[((B, tp, temp), f)]) for f in ("C", "torch"))
        results.append({"batch": B, "top_p": tp, "temperature": temp, "c_ms": c_ms, "torch_ms": t_ms,
                        "c_over_torch": c_ms / t_ms, "nucleus_median": float(sizes.median()),
                        "nucleus_max": float(sizes.max()),
                        "tokens_on_other_side": int(((c_mask > float("-inf")) != (t_mask > float("-inf"))).sum()),
                        "positions": logits.shape[0]})
    lines = ["| batch | top-p | temperature | C ms | torch ms | C / torch | nucleus median / max | tokens on the other side (of 128 x 49152) |",
             "|---|---|---|---|---|---|---|---|"]
    for x in results:
        lines.append(f"| {x['batch']} | {x['top_p']} | {x['temperature']} | {x['c_ms']:.3f} | {x['torch_ms']:.3f} | "
                     f"{x['c_over_torch']:.3f} | {x['nucleus_median']:.0f} / {x['nucleus_max']:.0f} | {x['tokens_on_other_side']} |")
    table = "\n".join(lines)
    print(table)
    print(buffer_table)
    meta = {"command": "python benchmarks/sampling.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "device": device_name("cpu"), "threads": args.threads, "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rounds": args.rounds}
    out = Path(args.out)
    atomic_write_bytes(out, (json.dumps({"meta": meta, "rows": results, "table": table, "buffer_rows": buffer_rows,
                                         "buffer_table": buffer_table}, indent=2) + "\n").encode())
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
