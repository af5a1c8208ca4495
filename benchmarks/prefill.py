"""The dense prefill: solc's (Stepper.prefill, what generate runs before its first step) against HF's
forward over the same prompt, side by side, with the arithmetic rate each reaches.

    python benchmarks/prefill.py                        # SmolLM2-135M, 256-token prompt, 1 and 2 threads

Why it matters: the prefill is dense in every generate call, so it bounds how far a policy's cheap steps
can bring a whole call below dense (issue 13, acceptance 3a: at 256 prompt + 64 new tokens the dense
prefill is ~0.3 of the call). The rate says how much faster an fp32 prefill could be on this machine:
GFLOP/s counts 2 x (non-embedding parameters) x prompt tokens, the GEMMs' work (attention's own
products at 256 tokens are ~1% of it). HF runs `model(ids, logits_to_keep=1)` (one LM-head row, as
solc's prefill, which returns hidden states only). Rows alternate within each round; medians over
--rounds. Prints a table and writes JSON (with the command) to --out.
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
from solc.cache import atomic_write_bytes  # noqa: E402
from training.cli import check_result_path  # noqa: E402


def _positive_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated ints >= 1")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a solc.load_model name (tiny-* for a smoke run)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--threads", type=_positive_ints, default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prefill_cpu.json"))
    args = p.parse_args(argv)
    if args.prompt_len < 2 or args.rounds < 1:
        p.error("--prompt-len must be >= 2 and --rounds >= 1")
    check_result_path(p, args.out, "python benchmarks/prefill.py", "--out")

    import solc
    from runtime.stepper import Stepper

    model = solc.load_model(args.model)
    sol = solc.compile(model, actions=["attn", "mlp", "quant"])
    if args.prompt_len + 1 > sol.max_seq_len:
        p.error(f"--prompt-len {args.prompt_len} does not fit the model's max_seq_len {sol.max_seq_len}")
    vocab = sol.token_embedding.shape[0]
    ids = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    embedding = sum(t.numel() for t in {id(t): t for t in (model.get_input_embeddings().weight,
                                                          model.get_output_embeddings().weight)}.values())
    gflop = 2 * (sum(t.numel() for t in model.parameters()) - embedding) * args.prompt_len / 1e9

    def hf():
        with torch.no_grad():
            model(ids, use_cache=True, logits_to_keep=1)

    def solc_prefill():
        Stepper(sol).prefill(ids, 1)

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs = {"hf": hf, "solc": solc_prefill}
        for fn in runs.values():
            fn()  # first calls: allocation, kernel builds, packed copies
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
        hf_ms, solc_ms = (statistics.median(times[n]) for n in ("hf", "solc"))
        rows.append({"threads": threads, "prompt_len": args.prompt_len, "hf_ms": hf_ms, "solc_ms": solc_ms,
                     "solc_over_hf": solc_ms / hf_ms, "hf_gflops": gflop / hf_ms * 1e3,
                     "solc_gflops": gflop / solc_ms * 1e3, "hf_rounds_ms": times["hf"], "solc_rounds_ms": times["solc"]})
    lines = ["| threads | prompt | HF ms | solc ms | solc / HF | HF GFLOP/s | solc GFLOP/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['prompt_len']} | {r['hf_ms']:.1f} | {r['solc_ms']:.1f} | {r['solc_over_hf']:.3f} | "
                     f"{r['hf_gflops']:.1f} | {r['solc_gflops']:.1f} |")
    table = "\n".join(lines)
    print(table)
    meta = {"command": "python benchmarks/prefill.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "device": device_name("cpu"), "torch": torch.__version__, "model": args.model, "gflop": gflop,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rounds": args.rounds}
    out = Path(args.out)
    atomic_write_bytes(out, (json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2) + "\n").encode())
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
