"""GRPO training throughput: episodes/s and peak memory of full updates (rollouts + PPO).

    python benchmarks/training.py                       # SmolLM2-135M, K=16, T=16, context 256, this device
    python benchmarks/training.py --device cuda --contexts-per-update 8

An episode is one schedule of one context (T controlled steps); an update rolls out
contexts_per_update x K episodes (one dense prefill per context) and runs the PPO epochs on them.
The first update is a warm-up and is not timed. Peak memory: the process' maximum resident set size
(CPU RSS, includes the model) and, on CUDA, torch's peak allocated device memory.
Prints a table and writes JSON (with the command that made it) to --json, after every timed update
("complete" turns true after the last): an interrupted run keeps the updates it timed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solc.cache import atomic_write_bytes  # noqa: E402
from training.cli import check_result_path  # noqa: E402
from training.grpo import GRPOConfig, Trainer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--device", default="auto")
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--contexts-per-update", type=int, default=2)
    p.add_argument("--rollout-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--updates", type=int, default=2, help="timed updates (after one warm-up update)")
    p.add_argument("--json", default=None, help="output JSON (default benchmarks/results/training-<device>.json)")
    args = p.parse_args(argv)
    if args.updates < 1:
        p.error(f"--updates must be >= 1, got {args.updates}")
    if args.json:  # the default is this script's own file under benchmarks/results
        check_result_path(p, args.json, "python benchmarks/training.py", "--json")

    cfg = GRPOConfig(
        model=args.model, corpus=args.corpus, device=args.device, context_length=args.context_length,
        horizon=args.horizon, group_size=args.group_size, contexts_per_update=args.contexts_per_update,
        rollout_batch=args.rollout_batch, threads=args.threads, progress=False, out="/tmp/solc-bench-training", max_minutes=0,
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    setup_s = time.perf_counter() - t0
    device = trainer.device
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    trainer.step(0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    walls, rollouts, updates = [], [], []
    episodes = cfg.contexts_per_update * cfg.group_size
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"
    out = Path(args.json or Path(__file__).resolve().parent / "results" / f"training-{device.type}.json")
    for u in range(1, args.updates + 1):
        t = time.perf_counter()
        m = trainer.step(u)
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
        rollouts.append(m["perf/rollout_s"])
        updates.append(m["perf/update_s"])
        wall = statistics.median(walls)
        result = {
            "command": "python benchmarks/training.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "model": cfg.model, "device": device_name, "context_length": cfg.context_length, "horizon": cfg.horizon,
            "group_size": cfg.group_size, "contexts_per_update": cfg.contexts_per_update, "episodes_per_update": episodes,
            "timed_updates": len(walls), "complete": len(walls) == args.updates, "setup_s": round(setup_s, 2),
            "update_s_median": round(wall, 3), "rollout_s_median": round(statistics.median(rollouts), 3),
            "ppo_s_median": round(statistics.median(updates), 3),
            "episodes_per_s": round(episodes / wall, 3),
            "controlled_steps_per_s": round(episodes * cfg.horizon / wall, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_cuda_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
            "torch": torch.__version__,
            # other processes on the same cores slow CPU runs a lot: record the 1-min load average
            "loadavg_1min_before_after": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        }
        # after every update, the whole file renamed over the old one: an interrupted run keeps the
        # updates it timed ("complete": false), never a torn file
        atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    rows = [
        ("model", result["model"]), ("device", result["device"]),
        ("K x T, context", f"{cfg.group_size} x {cfg.horizon}, {cfg.context_length}"),
        ("episodes / update", episodes), ("update (s, median)", result["update_s_median"]),
        ("  rollout (s)", result["rollout_s_median"]), ("  PPO (s)", result["ppo_s_median"]),
        ("episodes / s", result["episodes_per_s"]), ("peak RSS (MiB)", result["peak_rss_mib"]),
        ("peak CUDA (MiB)", result["peak_cuda_mib"] if result["peak_cuda_mib"] is not None else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
