"""Decode speed: HF static-cache decode vs solc dense, every uniform action, and policy-driven decode,
each beside its memory-traffic floor.

    python benchmarks/decode.py                                  # SmolLM2-135M shape, batch 1,8, context 512,16384
    python benchmarks/decode.py --model llama-3.2-1b --batch 1   # Llama-3.2-1B shape
    python benchmarks/decode.py --device cuda --hf-compile       # on a GPU: compiled HF baseline, CUDA graphs
    python benchmarks/decode.py --quick                          # a few actions, few steps (smoke run)

Issue 11's acceptance run (real weights, fp32, 1 and 2 threads, the whole grid, batch 16 mixed, generate):

    python benchmarks/decode.py --pretrained --threads 1,2 --batch 1 --contexts 512,4096,16384 --actions all \
        --mixed-batch 16 --mixed-contexts 512,4096 --generate 64 --no-policy --tag issue11

  mixed a/dense  batch --mixed-batch whose rows alternate between action a and dense: the step takes the
                 generic graph (per-row actions); its ratio is to the all-dense batch (dense variant)
  mixed spread   row b runs action (7 b) mod A: a batch spread over the grid
  generate       `sol.generate` at --generate-budget (Fixed) and dense, and HF `model.generate` (default
                 cache), --generate new tokens after a --prompt-len random prompt, greedy, batch 1,
                 interleaved calls; the first call of each is untimed
The table ends with issue 11's acceptance points (those the run covers), each met or missed with its
figure; the JSON holds them under meta.acceptance.

Rows, per (batch, context):
  hf static     HF's own decode step on a transformers StaticCache (model forward + greedy argmax), the
                step `generate(cache_implementation="static")` runs; torch.compile'd with --hf-compile.
  solc dense    the dense action through runtime.dispatch.StepDispatcher (+ argmax).
  solc direct   the same dense program called without the dispatcher (dispatch overhead = the difference).
  solc in place the dense action with the one-row GEMVs reading the weights in place instead of their
                packed copies (CPU, batch 1, where packing is on: runtime/ops/cpu_linear.c); its ratio
                is what the packed copies save.
  uniform a     every step runs action a (--actions: the 27-action grid on CUDA; on CPU by default
                dense, each axis' levels alone, all-lowest and the middle action).
  policy        a random-init PolicyNet (runtime.policy.PolicySource, greedy) at --budget (net keep 0.5):
                policy forward + dispatch + step each token, one episode spread over the rounds (run once
                untimed first, so every program it picks exists). Beside it: the policy's share of the
                step, the realized budget, and the latency that the per-action latencies measured in this
                run (a cost table for this batch and context) predict for the schedule it realized
                (actions it picks that no row times get a "(cost table)" row).
Rows run interleaved, --rounds times each (warm-up steps, then --steps timed steps), so drift of the
machine hits every row alike; medians are over all timed steps, per-round medians are in the JSON.

By default the cache is filled synthetically (random keys/values at positions 0..context-1, Quest page
statistics from `runtime.ops.reference.page_stats`), not by prefilling the model. Dense decode cost depends
on the cache's size, not its contents; sparse attention's does not quite: with GQA each query head picks
its own pages, and on random keys the G heads of a KV head pick nearly independent sets (a union of up to
~1 - (1 - keep)^G of the pages). --kv text (with --pretrained) prefills the context from the default corpus
(the first context of that length of its train split) through the model instead, so the pages and the
queries are real; the prefill runs once per context and is reused across --threads. Every row starts at
the same position (the context length) on the same cache; timed steps feed back their greedy token.

Floor = bytes the step must read / the device's measured read bandwidth (a large tensor sum, measured at
the start and probed once per round beside the rows; the floors use the best over the run):
  weights: every parameter once (tied LM head once; an untied input embedding only its B rows), except the
    MLP input projections, of which only the kept columns (ceil(mlp keep * d_in)) are read;
  KV: per layer, row and KV head, keys+values of the tokens attention reads: all kv_len = context+1 when
    dense, else the kept pages (min(ceil(ceil(keep*kv_len)/8) pages * 8, kv_len) tokens) plus the per-page
    key min/max of every visible page;
  policy rows add the policy network's parameters.
It is a lower bound: with GQA each query head picks its own pages and at batch > 1 rows keep different
MLP columns, so the union read can be larger. In weight-quant mode (the default) a row at b < 16 bits
reads the MLP's b-bit copies instead of its fp32 weights (int8: 1 byte an element + per-channel scales;
int4: half a byte + per-group scale/zero; `runtime.cost_model.BytesCostModel`'s count); a batch whose rows
use several bit-widths reads each copy once. In activation mode bits change no bytes read.

Prints a table and writes JSON + CSV (command, device, torch version, date, bandwidth in both) under --out.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("SOLC_CPU_FAST", "1")  # measure the CPU fast paths (on by default; SOLC_CPU_FAST=0 turns them off)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before torch loads: Ctrl-C during the imports ends with one line
    from training.startup import quiet_ctrl_c_while_loading

    quiet_ctrl_c_while_loading("decode.py")

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.append(str(ROOT / "benchmarks"))  # after the repo: benchmarks/training.py must not shadow the training package

import bench_cli  # noqa: E402
import solc  # noqa: E402
from solc import data as solc_data  # noqa: E402
from solc.cache import atomic_write_bytes  # noqa: E402
from solc.models import resolve_device  # noqa: E402
from runtime import hf_adapter  # noqa: E402
from runtime.actions import ActionSpace  # noqa: E402
from runtime.cost_model import BytesCostModel, cpu_name  # noqa: E402
from runtime.errors import ArgumentError  # noqa: E402
from runtime.dispatch import StepDispatcher  # noqa: E402
from runtime.generate import budget_targets  # noqa: E402
from runtime.stepper import Stepper  # noqa: E402
from runtime.ops import cpu_linear  # noqa: E402
from runtime.ops.reference import PAGE_SIZE, keep_count, page_stats  # noqa: E402
from runtime.policy import PolicyConfig, PolicyNet, PolicySource  # noqa: E402

# Random-init shapes (speed does not depend on the weights' values). max_position_embeddings is raised
# where needed so the longest context fits (rotary embeddings are computed, not tabulated).
_LLAMA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
SHAPES = {
    "smollm2-135m": dict(_LLAMA, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192),
    "llama-3.2-1b": dict(_LLAMA, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MLP_IN_FACTOR = {"gated": 2, "gated_fused": 2, "plain": 1}  # input matrices' rows per d_hidden


# -- device helpers ---------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu_name()}"


class BandwidthProbe:
    """Read bandwidth, probed once per round beside the rows (x.sum() over a `mib` MiB fp32 tensor):
    a shared machine's bandwidth drifts, and a floor is only as good as the bandwidth it divides by.
    The floors use the best read bandwidth seen over the whole run."""

    def __init__(self, device: torch.device, mib: int):
        self.device = device
        self.x = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
        self.gbps: list[float] = []

    @torch.no_grad()
    def probe(self) -> float:
        sync(self.device)
        t = time.perf_counter()
        self.x.sum()
        sync(self.device)
        self.gbps.append(self.x.numel() * 4 / (time.perf_counter() - t) / 1e9)
        return self.gbps[-1]


@torch.no_grad()
def measure_bandwidth(device: torch.device, mib: int, repeats: int = 7) -> dict:
    """Best-of-`repeats` read bandwidth (x.sum() over a `mib` MiB fp32 tensor) and copy bandwidth
    (y.copy_(x), counted as read + write), in GB/s (1e9 B/s)."""
    n = mib * 2**20 // 4
    x = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    nbytes = x.numel() * 4

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t)
        return min(times), statistics.median(times)

    read_best, read_med = best(lambda: x.sum())
    copy_best, copy_med = best(lambda: y.copy_(x))
    del x, y
    return {
        "buffer_mib": mib,
        "read_gbps": nbytes / read_best / 1e9,
        "read_gbps_median": nbytes / read_med / 1e9,
        "copy_gbps": 2 * nbytes / copy_best / 1e9,
        "copy_gbps_median": 2 * nbytes / copy_med / 1e9,
    }


# -- the memory-traffic floor -----------------------------------------------------------------------
class Floor:
    """Bytes a decode step must read (see the module docstring), from the compiled model's sites."""

    def __init__(self, sol, model, policy_bytes: int = 0):
        self.sol = sol
        self.itemsize = torch.empty((), dtype=sol.dtype).element_size()
        shape = hf_adapter.decoder_shape(model)
        seen, dense_weights = set(), 0
        for p in model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                dense_weights += p.numel() * p.element_size()
        self.d = shape["hidden_size"]
        self.untied_embedding = 0 if shape["tie_word_embeddings"] else sol.token_embedding.numel() * self.itemsize
        self.dense_weights = dense_weights
        self.mlp_sites = sol.info["mlp_sites"]
        self.bytes_model = BytesCostModel.for_model(sol)  # its MLP byte count (fp32 and low-bit copies)
        self.attn_sites = sol.info["attention_sites"]
        self.policy_bytes = policy_bytes

    def weights(self, acts: list, batch: int) -> int:
        """Weights read by one step whose rows run these actions: per MLP weight copy used (fp32, or the
        b-bit copy in weight-quant mode), the widest row's kept columns (a lower bound on the union)."""
        total = self.dense_weights - self.untied_embedding + batch * self.d * self.itemsize
        for site in self.mlp_sites:  # the fp32 MLP weights, re-added below per copy the rows read
            total -= site.d_in * site.d_hidden * (MLP_IN_FACTOR[site.kind] + 1) * self.itemsize
        low_bit = self.bytes_model.quant_mode == "weight"
        copies: dict[int, float] = {}  # bits of the copy -> widest keep of the rows reading it
        for a in acts:
            bits = a.bits if low_bit and a.bits < 16 else 16
            copies[bits] = max(copies.get(bits, 0.0), a.mlp)
        for bits, keep in copies.items():
            total += sum(self.bytes_model._mlp_bytes(layer, keep, bits) for layer in self.bytes_model.layers)
        return int(total)

    def kv(self, attn_keep: float, kv_len: int) -> int:
        """KV-cache bytes one row reads at this attention keep."""
        pages = -(-kv_len // PAGE_SIZE)
        total = 0
        for site in self.attn_sites:
            per_head_token = 2 * site.head_dim * self.itemsize  # key + value
            if attn_keep >= 1:
                total += site.n_kv_heads * kv_len * per_head_token
            else:
                k_pages = min(-(-keep_count(attn_keep, kv_len) // PAGE_SIZE), pages)
                tokens = min(k_pages * PAGE_SIZE, kv_len)
                meta = 2 * pages * site.head_dim * self.itemsize  # page min + max
                total += site.n_kv_heads * (tokens * per_head_token + meta)
        return total

    def step_bytes(self, actions: list[int], kv_len: int, with_policy: bool = False) -> int:
        """Bytes of one step whose rows run `actions` (one action index per row)."""
        acts = [self.sol.space[a] for a in actions]
        total = self.weights(acts, len(acts)) + sum(self.kv(a.attn, kv_len) for a in acts)
        return total + (self.policy_bytes if with_policy else 0)


# -- timing -----------------------------------------------------------------------------------------
def timed_loop(step, warmup: int, steps: int, device: torch.device) -> tuple[list[float], float]:
    """Call step(i) for i in 0..warmup+steps-1, each synchronised; per-step ms of the timed ones and
    their total wall time (s)."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        step(i)
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    return times, sum(times) / 1e3


def summarize(times: list[float], wall_s: float, batch: int) -> dict:
    return {
        "step_ms_median": statistics.median(times),
        "step_ms_mean": statistics.fmean(times),
        "step_ms_min": min(times),
        "step_ms_max": max(times),
        "tokens_per_s": batch * len(times) / wall_s,
    }


@torch.no_grad()
def fill_synthetic(kv_pairs, context: int, gen: torch.Generator, with_stats: list | None = None) -> None:
    """Random keys/values at positions 0..context-1 of every layer (one random block copied into
    each layer), zeros after; with_stats: the solc cache's (page_min, page_max) per layer, set from
    `page_stats` over the filled keys."""
    k0, v0 = kv_pairs[0]
    shape = (k0.shape[0], k0.shape[1], context, k0.shape[3])
    keys = torch.randn(shape, generator=gen, dtype=torch.float32).to(k0.device, k0.dtype)
    values = torch.randn(shape, generator=gen, dtype=torch.float32).to(k0.device, k0.dtype)
    low = high = None
    for i, (k, v) in enumerate(kv_pairs):
        k.zero_()
        v.zero_()
        k[:, :, :context].copy_(keys)
        v[:, :, :context].copy_(values)
        if with_stats is not None:
            if low is None:
                lengths = torch.full((k.shape[0],), context, device=k.device)
                low, high = page_stats(k, lengths)
            with_stats[i][0].copy_(low)
            with_stats[i][1].copy_(high)
    del keys, values, low, high


@torch.no_grad()
def fill_text(sol, cache, context: int, held: dict) -> None:
    """Every row of `cache` holds the model's own cache of the first `context` tokens of the default corpus's
    train split (the Stepper's dense prefill, on a cache of the same length), positions 0..context-1.
    `held` keeps each context's prefilled batch-1 cache tensors, so other thread counts reuse them."""
    if context not in held:
        tok = solc.load_tokenizer("smollm2-135m")
        ids = solc_data.get_contexts(tok, split="train", length=context, max_contexts=1).to(cache.tensors[0].device)
        stepper = Stepper(sol, dispatcher=StepDispatcher(sol))
        t = time.perf_counter()
        stepper.prefill(ids, steps=cache.max_len - context)  # its cache: context + steps = cache.max_len positions
        print(f"    prefilled {context} tokens of text in {time.perf_counter() - t:.0f}s", flush=True)
        held[context] = [x.clone() for x in stepper.cache.tensors]
    for dst, src in zip(cache.tensors, held[context]):
        dst.copy_(src.expand_as(dst))


def action_label(sol, a: int) -> str:
    act = sol.space[a]
    return f"attn {act.attn:g} mlp {act.mlp:g} {act.bits}b"


# -- one (batch, context) configuration -------------------------------------------------------------
class Runner:
    """A row's decode loop: run(warmup, steps) -> per-step ms of the timed steps."""

    def __init__(self, name: str, kind: str, action: int | None, run):
        self.name, self.kind, self.action, self.run = name, kind, action, run
        self.times: list[float] = []
        self.round_medians: list[float] = []
        self.error: str | None = None


class Config:
    """One (batch, context): one synthetic cache shared by every row (the HF StaticCache uses the solc
    cache's key/value tensors as its storage), rows interleaved over --rounds so that drift of the
    machine hits them alike."""

    def __init__(self, args, sol, model, floor, device, batch, context, mixed=False):
        self.args, self.sol, self.model, self.floor = args, sol, model, floor
        self.device, self.batch, self.context, self.mixed = device, batch, context, mixed
        self.threads = torch.get_num_threads()
        self.load_average = os.getloadavg()[0]
        self.max_len = context + max(args.warmup + args.steps, args.rounds * (args.warmup + args.steps)) + 1
        self.kv_len = context + 1  # the first timed step's query sees the context plus itself
        self.gen = torch.Generator().manual_seed(args.seed)
        self.feed0 = torch.randint(0, sol.token_embedding.shape[0], (batch, 1), generator=self.gen).to(device)
        self.rows: list[dict] = []
        self.latency: dict[int, float] = {}  # action -> median step ms (the in-run cost table)
        self.policy_ms: list[float] = []
        self.policy_actions: list[torch.Tensor] = []  # [B] per timed policy step

    def positions(self, i: int) -> torch.Tensor:
        return torch.full((self.batch, 1), self.context + i, dtype=torch.long, device=self.device)

    def timed(self, step, warmup: int, steps: int) -> list[float]:
        return timed_loop(step, warmup, steps, self.device)[0]

    # the rows' decode loops ------------------------------------------------------------------------
    def greedy_loop(self, call):
        """Steps from the context position feeding back their own greedy token; call(ids, pos, i) -> logits."""
        feed = [self.feed0]

        def step(i):
            if i == 0:
                feed[0] = self.feed0
            feed[0] = call(feed[0], self.positions(i), i)[:, -1].argmax(-1, keepdim=True)

        return lambda warmup, steps: self.timed(step, warmup, steps)

    def hf_runner(self, hf_cache) -> Runner:
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        fn = hf_adapter.static_cache_decode_step(self.model, hf_cache, compile=self.args.hf_compile, compile_mode=mode)

        def call(ids, pos, i):
            if i == 0:  # restart: the next token goes to slot `context`
                hf_adapter.set_static_cache_length(hf_cache, self.context)
            return fn(ids, pos)

        return Runner("hf static" + (" compiled" if self.args.hf_compile else ""), "hf", self.sol.space.dense_index,
                      self.greedy_loop(call))

    def mixed_actions(self, action: int) -> torch.Tensor:
        """[B, 1]: rows alternate between `action` and dense (dense first when action is dense: then
        every row is dense and the step takes the dense variant, the row it is compared with)."""
        dense = self.sol.space.dense_index
        return torch.tensor([[action if b % 2 == 0 else dense] for b in range(self.batch)], device=self.device)

    def spread_actions(self) -> torch.Tensor:
        """[B, 1]: row b runs action (b * 7) mod A: a batch whose rows cover the grid."""
        A = len(self.sol.space)
        return torch.tensor([[(b * 7) % A] for b in range(self.batch)], device=self.device)

    def solc_runner(self, name, kind, action, disp, cache, direct=False, acts=None) -> Runner:
        acts = torch.full((self.batch, 1), action, dtype=torch.long, device=self.device) if acts is None else acts
        if direct:  # the dispatcher's own program for this key, called without the dispatcher
            def call(ids, pos, i):
                variant = disp._variants.get((action, self.batch))  # internal: built by the first step
                if variant is None:
                    return disp.step(ids, acts, pos, cache)[0]
                return variant(ids, pos, cache)[0]
        else:
            def call(ids, pos, i):
                return disp.step(ids, acts, pos, cache)[0]
        return Runner(name, kind, action, self.greedy_loop(call))

    @staticmethod
    def in_place(runner: Runner) -> Runner:
        """The runner's steps with the GEMVs reading the weights in place instead of their packed copies."""
        run = runner.run

        def unpacked(warmup, steps):
            with cpu_linear.packed_copies_off():
                return run(warmup, steps)

        runner.run = unpacked
        return runner

    def policy_runner(self, disp, cache) -> Runner:
        """One policy episode over all rounds (horizon rounds x (warmup + steps)): each run() continues
        it, while the base model's positions restart at the context (the policy has its own cache)."""
        sol, B, args = self.sol, self.batch, self.args
        source = PolicySource(args.policy_net, greedy=not args.policy_sample)
        no_dense = torch.zeros(B, dtype=torch.bool, device=self.device)
        targets = budget_targets(args.budget, B)
        horizon = args.rounds * (args.warmup + args.steps)
        state = {}

        def restart():
            source.reset(sol.space, B, targets, horizon, torch.Generator().manual_seed(args.seed))
            state.update(t=0, feed=self.feed0,
                         hidden=torch.zeros(B, sol.token_embedding.shape[1], dtype=sol.dtype, device=self.device))

        def run(warmup, steps):
            def step(i):
                t = time.perf_counter()
                action = source.next_actions(state["t"], state["hidden"], sol.token_embedding[state["feed"][:, 0]], no_dense)
                sync(self.device)
                state["t"] += 1
                if i >= warmup:
                    self.policy_ms.append((time.perf_counter() - t) * 1e3)
                    self.policy_actions.append(action.cpu())
                logits, hidden = disp.step(state["feed"], action[:, None], self.positions(i), cache)
                state["feed"], state["hidden"] = logits[:, -1].argmax(-1, keepdim=True), hidden[:, -1]

            return self.timed(step, warmup, steps)

        runner = Runner(f"policy @ {args.budget:g}", "policy", None, run)
        runner.restart, runner.horizon = restart, horizon
        return runner

    # the configuration ----------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, actions: list[int]) -> None:
        sol, B, args = self.sol, self.batch, self.args
        dense = sol.space.dense_index
        cache = sol.new_cache(B, self.max_len, device=self.device)
        layers = [cache.tensors[i:i + 4] for i in range(0, len(cache.tensors), 4)]
        if args.kv == "text":
            fill_text(sol, cache, self.context, args.text_caches)
        else:
            fill_synthetic([(t[0], t[1]) for t in layers], self.context, self.gen,
                           with_stats=[(t[2], t[3]) for t in layers])
        # A dispatcher per configuration: a CUDA-graph variant replays on the cache it was captured with.
        disp = StepDispatcher(sol, mode=args.mode)
        runners = []
        hf_cache = None
        if not args.no_hf:
            hf_cache = hf_adapter.static_cache(self.model, B, self.max_len, sol.dtype, self.device,
                                               storage=[(t[0], t[1]) for t in layers])
            runners.append(self.hf_runner(hf_cache))
        runners.append(self.solc_runner("solc dense", "solc", dense, disp, cache))
        # The direct and in-place rows get dispatchers of their own: a variant's C plan is rebuilt when
        # another caller's inputs reach it (the direct row's do), which would charge the next row with it.
        runners.append(self.solc_runner("solc dense, direct", "solc_direct", dense, StepDispatcher(sol, mode=args.mode),
                                        cache, direct=True))
        if B == 1 and self.device.type == "cpu" and cpu_linear.packing_enabled():
            runners.append(self.in_place(self.solc_runner("solc dense, in place", "solc_in_place", dense,
                                                          StepDispatcher(sol, mode=args.mode), cache)))
        if self.mixed:  # rows alternate between the action and dense: the generic (per-row) graph
            runners += [self.solc_runner(f"mixed {a}/dense", "mixed", a, disp, cache, acts=self.mixed_actions(a))
                        for a in actions if a != dense]
            runners.append(self.solc_runner("mixed spread", "mixed_spread", None, disp, cache,
                                            acts=self.spread_actions()))
        else:
            runners += [self.solc_runner(f"uniform {a}", "uniform", a, disp, cache) for a in actions if a != dense]
        if not args.no_policy and not self.mixed:
            runners.append(self.policy_runner(disp, cache))

        # Untimed first calls build (compile, capture) every program before any timing. The policy
        # runs its whole episode untimed first (greedy: the timed episode picks the same actions), so
        # every program it uses exists, and any action it picks that no row times gets a row of its
        # own: the in-run cost table must price its whole schedule.
        self.first_calls(runners)
        policy = next((r for r in runners if r.kind == "policy" and not r.error), None)
        if policy is not None:
            picked = set(torch.stack(self.policy_actions).flatten().tolist()) if self.policy_actions else set()
            timed_actions = {r.action for r in runners if r.kind in ("solc", "uniform")}
            extra = [self.solc_runner(f"uniform {a} (cost table)", "uniform_aux", a, disp, cache)
                     for a in sorted(picked - timed_actions)]
            self.first_calls(extra)
            runners += extra
            policy.restart()
        self.policy_ms.clear()
        self.policy_actions.clear()
        for rnd in range(args.rounds):
            t = time.perf_counter()
            for r in runners:
                if r.error:
                    continue
                try:
                    times = r.run(args.warmup, args.steps)
                except Exception as err:  # noqa: BLE001
                    r.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                    print(f"    {r.name}: FAILED ({r.error})", flush=True)
                    continue
                r.times += times
                r.round_medians.append(statistics.median(times))
            bw = args.probe.probe()
            print(f"    round {rnd + 1}/{args.rounds}: {len(runners)} rows in {time.perf_counter() - t:.1f}s; "
                  f"read bandwidth {bw:.1f} GB/s", flush=True)

        for r in runners:
            if r.kind in ("solc", "uniform", "uniform_aux") and not r.error and r.action is not None:
                self.latency[r.action] = statistics.median(r.times)
        for r in runners:
            self.add_row(r)
        del cache, disp, hf_cache, runners, layers
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def first_calls(self, runners) -> None:
        for r in runners:
            t = time.perf_counter()
            try:
                if hasattr(r, "restart"):
                    r.restart()
                    r.run(0, r.horizon)
                else:
                    r.run(0, 1)
            except Exception as err:  # noqa: BLE001 - report and go on with the other rows
                r.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                print(f"    {r.name}: FAILED ({r.error})", flush=True)
            if time.perf_counter() - t > 5:
                print(f"    {r.name}: first call(s) {time.perf_counter() - t:.1f}s", flush=True)

    # results --------------------------------------------------------------------------------------
    def add_row(self, r: Runner) -> None:
        row = {"row": r.name, "kind": r.kind, "threads": self.threads, "batch": self.batch, "context": self.context,
               "action": r.action, "action_label": action_label(self.sol, r.action) if r.action is not None else "",
               "steps": len(r.times), "load_average": self.load_average}
        if r.error:
            row["error"] = r.error
            self.rows.append(row)
            return
        row.update(summarize(r.times, sum(r.times) / 1e3, self.batch))
        row["round_medians_ms"] = r.round_medians
        if r.kind == "policy":
            acts = torch.stack(self.policy_actions, 1)  # [B, timed steps]
            costs = self.sol.space.cost_table()[acts]  # [B, steps, 3]
            realized = {axis: float(costs[..., j].mean()) for j, axis in enumerate(("attn", "mlp", "quant"))}
            uniform_steps = [s for s in range(acts.shape[1]) if bool((acts[:, s] == acts[0, s]).all())]
            pred = statistics.fmean(self.latency[int(acts[0, s])] for s in uniform_steps) if uniform_steps else None
            # predicted over the steps where every row agreed (mixed steps run the generic graph)
            mean_uniform = statistics.fmean(r.times[s] for s in uniform_steps) if uniform_steps else None
            floor_bytes = statistics.fmean(self.floor.step_bytes(acts[:, s].tolist(), self.kv_len, with_policy=True)
                                           for s in range(acts.shape[1]))
            policy_ms = statistics.median(self.policy_ms)
            row.update(policy_ms_median=policy_ms, policy_share=policy_ms / row["step_ms_median"],
                       realized_attn=realized["attn"], realized_mlp=realized["mlp"], realized_quant=realized["quant"],
                       realized_net_keep=sum(realized.values()) / 3, mixed_steps=acts.shape[1] - len(uniform_steps),
                       predicted_ms=pred, predicted_ratio=mean_uniform / pred if pred else None,
                       actions_histogram=json.dumps({int(a): int((acts == a).sum()) for a in acts.unique()}))
        elif r.kind == "mixed":
            floor_bytes = self.floor.step_bytes(self.mixed_actions(r.action)[:, 0].tolist(), self.kv_len)
        elif r.kind == "mixed_spread":
            floor_bytes = self.floor.step_bytes(self.spread_actions()[:, 0].tolist(), self.kv_len)
        else:
            floor_bytes = self.floor.step_bytes([r.action] * self.batch, self.kv_len)
        row["floor_bytes"] = int(floor_bytes)  # floor_ms / floor_ratio: set in main, from the run's best bandwidth
        self.rows.append(row)


# -- output -----------------------------------------------------------------------------------------
def fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(rows: list[dict], meta: dict) -> str:
    lines = []
    bw = meta["bandwidth"]
    lines.append(f"device: {meta['device']} | torch {meta['torch']} | {meta['model']} ({meta['weights']}, {meta['dtype']}) "
                 f"| solc dispatcher mode {meta['mode']}")
    lines.append(f"measured read bandwidth ({bw['buffer_mib']} MiB tensor sum): best {bw['read_gbps']:.1f} GB/s over the run "
                 f"(start: best of 7 {bw['start_read_gbps']:.1f}; per-round probes: median {bw['probe_read_gbps_median']:.1f}, "
                 f"max {bw['probe_read_gbps_max']:.1f}); copy {bw['copy_gbps']:.1f} GB/s at start. "
                 "floor = bytes read / best read bandwidth")
    lines.append(f"{meta['rounds']} rounds x ({meta['warmup']} warm-up + {meta['steps']} timed steps) per row; "
                 f"load average {meta['load_average_start'][0]:.2f} at start, {meta['load_average_end'][0]:.2f} at end "
                 f"on {os.cpu_count()} CPUs")
    header = f"{'row':<26} {'action':<22} {'tok/s':>9} {'ms/step':>9} {'/dense':>7} {'floor ms':>9} {'/floor':>7}  notes"
    configs = sorted({(r.get("threads", 0), r["batch"], r["context"]) for r in rows if r["kind"] not in GENERATE_KINDS})
    for threads, batch, context in configs:
        sub = [r for r in rows if (r.get("threads", 0), r["batch"], r["context"]) == (threads, batch, context)
               and r["kind"] not in GENERATE_KINDS]
        lines.append("")
        lines.append(f"{threads} thread(s), batch {batch}, context {context} (load average {sub[0].get('load_average', 0):.2f})")
        lines.append(header)
        lines.append("-" * len(header))
        dense = next((r for r in sub if r["kind"] == "solc" and "step_ms_median" in r), None)
        hf = next((r for r in sub if r["kind"] == "hf" and "step_ms_median" in r), None)
        for r in sub:
            if "error" in r:
                lines.append(f"{r['row']:<26} {r['action_label']:<22} FAILED: {r['error'][:80]}")
                continue
            ratio = r["step_ms_median"] / dense["step_ms_median"] if dense else None
            notes = []
            if r["kind"] == "solc" and hf:
                notes.append(f"{r['step_ms_median'] / hf['step_ms_median']:.2f} of hf")
            if r["kind"] == "solc_direct" and dense:
                notes.append(f"dispatch overhead {dense['step_ms_median'] - r['step_ms_median']:+.2f} ms")
            if r["kind"] == "solc_in_place" and dense:
                notes.append("the GEMVs read the weights in place, not their packed copies")
            if r["kind"] == "policy":
                notes.append(f"policy {r['policy_ms_median']:.2f} ms ({100 * r['policy_share']:.1f}%)")
                notes.append(f"net keep {r['realized_net_keep']:.3f}")
                if r.get("predicted_ms"):
                    notes.append(f"cost-table pred {r['predicted_ms']:.2f} ms (mean/pred {r['predicted_ratio']:.3f})")
                if r.get("mixed_steps"):
                    notes.append(f"{r['mixed_steps']} mixed steps")
            lines.append(f"{r['row']:<26} {r['action_label']:<22} {fmt(r['tokens_per_s'], '9.2f')} "
                         f"{fmt(r['step_ms_median'], '9.2f')} {fmt(ratio, '7.3f')} {fmt(r.get('floor_ms'), '9.2f')} "
                         f"{fmt(r.get('floor_ratio'), '7.2f')}  {'; '.join(notes)}")
    gen = [r for r in rows if r["kind"] in GENERATE_KINDS]
    if gen:
        lines.append("")
        lines.append(f"generate: {gen[0]['new_tokens']} new tokens after a {gen[0]['prompt_len']}-token prompt, batch 1, greedy")
        for r in gen:
            if "error" in r:
                lines.append(f"{r['threads']} thread(s)  {r['row']:<30} FAILED: {r['error'][:80]}")
                continue
            lines.append(f"{r['threads']} thread(s)  {r['row']:<30} {r['tokens_per_s']:8.2f} tok/s  "
                         f"{r['call_s_median']:7.3f} s/call  (load average {r['load_average']:.2f})")
    checks = meta.get("acceptance") or []
    if checks:
        lines.append("")
        lines.append("issue 11 acceptance (ratios to solc dense in the same run unless said otherwise)")
        for c in checks:
            lines.append(f"  {'met   ' if c['met'] else 'MISSED'} {c['check']}: {c['value']:.3f} (target {c['op']} {c['target']:g})")
    text = "\n".join(lines)
    print(text)
    return text


def acceptance(rows: list[dict], space) -> list[dict]:
    """Issue 11's acceptance points 1-6 evaluated on this run's rows (those the run has)."""
    from runtime.actions import Action

    checks = []

    def add(check, value, op, target):
        checks.append({"check": check, "value": value, "op": op, "target": target,
                       "met": value <= target if op == "<=" else value >= target})

    def median(kind, threads, batch, context, action=None):
        r = next((r for r in rows if r["kind"] == kind and r.get("threads") == threads and r["batch"] == batch
                  and r["context"] == context and (action is None or r["action"] == action)
                  and "step_ms_median" in r), None)
        return r["step_ms_median"] if r else None

    def index(attn, mlp, bits):
        try:
            return space.index(Action(attn=attn, mlp=mlp, bits=bits))
        except (KeyError, ValueError):
            return None

    configs = sorted({(r.get("threads"), r["batch"], r["context"]) for r in rows if r["kind"] in ("solc", "uniform", "mixed")})
    for threads, batch, context in configs:
        where = f"{threads} thread(s), batch {batch}, context {context}"
        dense = median("solc", threads, batch, context)
        if dense is None:
            continue
        hf = median("hf", threads, batch, context)
        if hf is not None and batch == 1:
            add(f"1. solc dense / hf static, {where}", dense / hf, "<=", 1.0)
        targets = {(1.0, 0.4, 512): 0.80, (0.1, 1.0, 4096): 0.80, (0.1, 1.0, 16384): 0.65,
                   (0.1, 0.4, 512): 0.75, (0.1, 0.4, 16384): 0.55}
        for (attn, mlp, ctx), target in targets.items():
            a = index(attn, mlp, 16)
            ms = median("uniform", threads, batch, context, a) if a is not None and ctx == context and batch == 1 else None
            if ms is not None:
                add(f"{2 if attn == 1.0 else 3 if mlp == 1.0 else 4}. attn {attn:g} / mlp {mlp:g} / 16 bit, {where}",
                    ms / dense, "<=", target)
        slow = [(r["step_ms_median"] / dense, r["row"]) for r in rows
                if r["kind"] in ("uniform", "mixed", "mixed_spread") and r.get("threads") == threads
                and r["batch"] == batch and r["context"] == context and "step_ms_median" in r]
        if slow:
            worst, row = max(slow)
            add(f"5. slowest action ({row}), {where}", worst, "<=", 1.15)
    for threads in sorted({r["threads"] for r in rows if r["kind"] in GENERATE_KINDS}):
        gen = {r["kind"]: r for r in rows if r["kind"] in GENERATE_KINDS and r["threads"] == threads and "tokens_per_s" in r}
        if "generate_budget" in gen and "generate_hf" in gen:
            add(f"6. sol.generate @ {gen['generate_budget']['budget']:g} (Fixed) tok/s / HF model.generate tok/s, "
                f"{threads} thread(s)", gen["generate_budget"]["tokens_per_s"] / gen["generate_hf"]["tokens_per_s"], ">=", 1.0)
    return checks


GENERATE_KINDS = ("generate_hf", "generate_budget", "generate_dense")


@torch.no_grad()
def run_generate(args, sol, model, device) -> list[dict]:
    """`sol.generate` at --generate-budget (Fixed) and dense vs HF `model.generate`: --generate new tokens
    after a --prompt-len prompt, greedy, batch 1, each called --generate-rounds times interleaved."""
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, sol.token_embedding.shape[0], (1, args.prompt_len), generator=gen).to(device)
    n = args.generate
    calls = [
        ("HF model.generate", "generate_hf", lambda: hf_adapter.generate_greedy(model, prompt, n)),
        (f"sol.generate @ {args.generate_budget:g} (Fixed)", "generate_budget",
         lambda: sol.generate(prompt, budget=args.generate_budget, max_new_tokens=n).tokens),
        ("sol.generate dense", "generate_dense", lambda: sol.generate(prompt, max_new_tokens=n).tokens),
    ]
    load = os.getloadavg()[0]
    times = {kind: [] for _, kind, _ in calls}
    errors = {}
    for rnd in range(args.generate_rounds + 1):  # round 0 untimed (first calls)
        for name, kind, fn in calls:
            if kind in errors:
                continue
            t = time.perf_counter()
            try:
                out = fn()
            except Exception as err:  # noqa: BLE001
                errors[kind] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                print(f"    {name}: FAILED ({errors[kind]})", flush=True)
                continue
            elapsed = time.perf_counter() - t
            if out.shape[1] != args.prompt_len + n:
                errors[kind] = f"returned {out.shape[1] - args.prompt_len} new tokens, expected {n}"
            elif rnd > 0:
                times[kind].append(elapsed)
    rows = []
    for name, kind, _ in calls:
        row = {"row": name, "kind": kind, "threads": torch.get_num_threads(), "batch": 1, "context": args.prompt_len,
               "action": None, "action_label": "", "new_tokens": n, "prompt_len": args.prompt_len,
               "budget": args.generate_budget if kind == "generate_budget" else 1.0, "load_average": load}
        if kind in errors:
            row["error"] = errors[kind]
        else:
            med = statistics.median(times[kind])
            row.update(call_s_median=med, call_s=times[kind], tokens_per_s=n / med, steps=len(times[kind]))
        rows.append(row)
    return rows


CSV_FIELDS = ["row", "kind", "threads", "batch", "context", "action", "action_label", "steps", "tokens_per_s", "step_ms_median",
              "step_ms_mean", "step_ms_min", "step_ms_max", "floor_bytes", "floor_ms", "floor_ratio",
              "policy_ms_median", "policy_share", "realized_attn", "realized_mlp", "realized_quant",
              "realized_net_keep", "mixed_steps", "predicted_ms", "predicted_ratio", "actions_histogram", "load_average",
              "new_tokens", "call_s_median", "error"]


def write_outputs(out_dir: Path, stem: str, meta: dict, rows: list[dict], table: str) -> list[Path]:
    """stem.json and stem.csv, each written whole and renamed over the old one (solc.cache.atomic_write):
    an interrupt leaves the previous complete file, never a torn one."""
    jpath, cpath = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    atomic_write_bytes(jpath, (json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2) + "\n").encode())
    text = io.StringIO(newline="")
    if not meta.get("complete", True):
        text.write("# complete: False (an interrupted or still running run: the rows measured so far)\n")
    for key in ("command", "device", "torch", "date", "model", "weights", "dtype", "mode"):
        text.write(f"# {key}: {meta[key]}\n")
    text.write(f"# read bandwidth GB/s (best over the run, the floors' divisor): {meta['bandwidth']['read_gbps']:.2f}\n")
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_bytes(cpath, text.getvalue().encode())
    bench_cli.WRITTEN[:] = [jpath, cpath]
    return [jpath, cpath]


# -- main -------------------------------------------------------------------------------------------
def axes_subset(space) -> list[int]:
    """Dense, each non-dense level of each axis alone, every axis at its lowest level, and the middle
    action of the grid (the CPU default: the grid's structure at a third of its cost)."""
    dense = space[space.dense_index]
    picks = {space.dense_index, 0, len(space) // 2}
    for i in range(len(space)):
        a = space[i]
        if sum((a.attn != dense.attn, a.mlp != dense.mlp, a.bits != dense.bits)) == 1:
            picks.add(i)
    return sorted(picks)


def ints(s: str) -> list[int]:
    """A comma-separated list of integers >= 1 (an option's type: argparse names the option on an error)."""
    try:
        values = [int(x) for x in s.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{s!r} is invalid: expected comma-separated integers >= 1")
    return values


def parse_actions(p: argparse.ArgumentParser, text: str, space) -> list[int]:
    """--actions as action indices of `space`, or p.error naming the option and what is valid."""
    if text == "all":
        return list(range(len(space)))
    if text == "axes":
        return axes_subset(space)
    if text == "none":
        return []
    try:
        actions = [int(x) for x in text.split(",")]
    except ValueError:
        actions = None
    if not actions or not all(0 <= a < len(space) for a in actions):
        p.error(f"--actions={text} is invalid: expected all, axes, none, auto or comma-separated action indices "
                f"in 0..{len(space) - 1}")
    return actions


def check_values(p: argparse.ArgumentParser, args) -> None:
    """The numeric options' ranges (before anything is measured or loaded); p.error names the option."""
    for option, lo in (("steps", 1), ("rounds", 1), ("warmup", 0), ("bandwidth_mib", 1), ("generate", 0),
                       ("generate_rounds", 1), ("prompt_len", 1)):
        value = getattr(args, option)
        if value is not None and value < lo:
            p.error(f"--{option.replace('_', '-')}={value} is invalid: expected an integer >= {lo}")
    for option in ("budget", "generate_budget"):
        value = getattr(args, option)
        if not 0 < value <= 1:
            p.error(f"--{option.replace('_', '-')}={value:g} is invalid: expected a number in (0, 1] (net keep)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", choices=sorted(SHAPES), help="model shape (random weights)")
    p.add_argument("--pretrained", action="store_true", help="real SmolLM2-135M weights via solc.load_model (needs the asset cache)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--batch", type=ints, default=[1, 8], help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--contexts", type=ints, default=[512, 16384], help="comma-separated cache lengths (default 512,16384)")
    p.add_argument("--actions", default="auto",
                   help="'all' (the whole grid), 'axes' (dense, each axis' levels alone, all-lowest, the middle action), "
                        "'none', or comma-separated action indices; auto: all on CUDA, axes on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per row and round (default 1 on CPU, 25 on CUDA)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps before each row's timed ones, every round (default 0 on CPU, 5 on CUDA; "
                        "every program has run once before the first round anyway)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rows run interleaved, this many times each (default 8 on CPU, 4 on CUDA; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 warm-up, 1 round, actions 0,13,26 unless given")
    p.add_argument("--mode", default=None, choices=["eager", "compile", "cudagraph"],
                   help="solc dispatcher mode (default: the dispatcher's: cudagraph on CUDA, eager on CPU)")
    p.add_argument("--hf-compile", action="store_true", help="torch.compile the HF decode step (reduce-overhead on CUDA)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF baseline rows")
    p.add_argument("--no-policy", action="store_true", help="skip the policy-driven rows")
    p.add_argument("--budget", type=float, default=0.5, help="policy budget (every axis; net keep target)")
    p.add_argument("--policy-sample", action="store_true", help="sample the policy's actions (rows may differ) instead of greedy")
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="buffer for the bandwidth measurement")
    p.add_argument("--threads", type=ints, default=None,
                   help="comma-separated torch CPU thread counts, each measured in turn in this process (default: torch's)")
    p.add_argument("--mixed-batch", type=ints, default=[],
                   help="batch sizes measured with mixed rows: per action, rows alternating between it and dense "
                        "(the generic graph), and one batch spread over the grid (issue 11: 16)")
    p.add_argument("--mixed-contexts", type=ints, default=None, help="contexts of the mixed-batch rows (default: --contexts)")
    p.add_argument("--generate", type=int, default=0,
                   help="new tokens of the generate rows (sol.generate at --generate-budget and dense vs HF model.generate; "
                        "0 = none; issue 11: 64)")
    p.add_argument("--generate-budget", type=float, default=0.6, help="budget of the sol.generate row (Fixed scheduler)")
    p.add_argument("--generate-rounds", type=int, default=5, help="timed calls per generate row, interleaved")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens of the generate rows")
    p.add_argument("--kv", default="random", choices=["random", "text"],
                   help="cache contents: random keys/values (default), or the model's cache of real text (--pretrained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    args = p.parse_args(argv)
    if args.kv == "text" and not args.pretrained:
        p.error("--kv text needs --pretrained (the model's cache of real text)")
    if args.pretrained and args.model != "smollm2-135m":
        p.error("--pretrained is available for smollm2-135m only")
    check_values(p, args)

    args.threads = args.threads or [torch.get_num_threads()]
    torch.set_num_threads(args.threads[0])
    try:
        device = resolve_device(args.device, "--device")
    except ArgumentError as e:
        p.error(str(e))
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cpu = device.type == "cpu"
    if args.quick:
        args.steps = args.steps if args.steps is not None else 2
        args.warmup = args.warmup if args.warmup is not None else 1
        args.rounds = args.rounds if args.rounds is not None else 1
        if args.actions == "auto":
            args.actions = "0,13,26"
    args.steps = args.steps if args.steps is not None else (1 if cpu else 25)
    args.rounds = args.rounds if args.rounds is not None else (8 if cpu else 4)
    args.warmup = args.warmup if args.warmup is not None else (0 if cpu else 5)
    if args.actions == "auto":
        args.actions = "axes" if cpu else "all"
    actions = parse_actions(p, args.actions, ActionSpace())  # solc.compile's default grid, before the model loads
    stem = f"decode_{device.type}_{args.model}" + (f"_{args.tag}" if args.tag else "")
    bench_cli.check_outputs(p, Path(args.out), stem, "decode.py")
    command = "python benchmarks/decode.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    t_start = time.perf_counter()

    if cpu and load_start[0] > (os.cpu_count() or 1) - 0.5 and torch.get_num_threads() > 1:
        print(f"warning: load average {load_start[0]:.1f} on {os.cpu_count()} CPUs: with {torch.get_num_threads()} "
              "threads, OpenMP waits on descheduled threads and timings swing by 10x; consider --threads 1", flush=True)
    print(f"measuring bandwidth ({args.bandwidth_mib} MiB) ...", flush=True)
    args.bandwidth = measure_bandwidth(device, args.bandwidth_mib)
    args.probe = BandwidthProbe(device, args.bandwidth_mib)

    max_context = max(args.contexts + (args.mixed_contexts or []) + [args.prompt_len + args.generate]) \
        + args.rounds * (args.warmup + args.steps)
    args.text_caches = {}
    if args.pretrained:
        model = solc.load_model("smollm2-135m", dtype=dtype, device=device)
        weights = "pretrained SmolLM2-135M-Instruct"
        trained = hf_adapter.max_positions(model)
        if hf_adapter.extend_positions(model, max_context + args.warmup + args.steps + 8):
            # a speed measurement: positions past the trained length cost what any position costs
            weights += f" (positions extended past the trained {trained} for the longest context)"
            print(f"note: contexts past {trained} positions run beyond SmolLM2's trained length (speed only)", flush=True)
    else:
        shape = dict(SHAPES[args.model])
        shape["max_position_embeddings"] = max(shape["max_position_embeddings"], max_context + args.warmup + args.steps + 8)
        model = hf_adapter.model_from_config(shape, seed=args.seed, dtype=dtype).to(device)
        weights = "random init"
    t = time.perf_counter()
    sol = solc.compile(model, max_seq_len=max_context + args.warmup + args.steps + 8)
    print(f"solc.compile: {time.perf_counter() - t:.1f}s", flush=True)
    space = sol.space
    actions = parse_actions(p, args.actions, space)  # the compiled grid: the default one, checked above
    policy_bytes = 0
    if not args.no_policy:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            args.policy_net = PolicyNet(PolicyConfig.for_model(sol)).to(device).eval()
        policy_bytes = sum(q.numel() * q.element_size() for q in args.policy_net.parameters())
    floor = Floor(sol, model, policy_bytes)

    rows: list[dict] = []

    def save(complete: bool) -> dict:
        """Write the rows so far (after every configuration, so an interrupted run keeps what it measured;
        meta "complete" says whether it ran to the end). Returns the meta."""
        probes = args.probe.gbps or [args.bandwidth["read_gbps"]]
        bandwidth = {
            "buffer_mib": args.bandwidth_mib,
            "read_gbps": max(args.bandwidth["read_gbps"], *probes),  # what the floors divide by
            "start_read_gbps": args.bandwidth["read_gbps"],
            "start_read_gbps_median": args.bandwidth["read_gbps_median"],
            "copy_gbps": args.bandwidth["copy_gbps"],
            "probe_read_gbps_median": statistics.median(probes),
            "probe_read_gbps_max": max(probes),
            "probe_read_gbps": probes,
        }
        for r in rows:
            if r.get("floor_bytes"):
                r["floor_ms"] = r["floor_bytes"] / (bandwidth["read_gbps"] * 1e9) * 1e3
                r["floor_ratio"] = r["step_ms_median"] / r["floor_ms"]
        meta = {
            "command": command,
            "complete": complete,
            "device": device_name(device),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "date": started.isoformat(timespec="seconds"),
            "host": platform.node(),
            "model": args.model,
            "weights": weights,
            "shape": hf_adapter.decoder_shape(model),
            "dtype": str(dtype).removeprefix("torch."),
            "mode": StepDispatcher(sol, mode=args.mode).mode,
            "hf_compile": args.hf_compile,
            "kv": args.kv,
            "steps": args.steps,
            "warmup": args.warmup,
            "budget": args.budget,
            "rounds": args.rounds,
            "actions": actions,
            "policy_params": sum(q.numel() for q in args.policy_net.parameters()) if not args.no_policy else 0,
            "threads": args.threads,
            "mixed_batch": args.mixed_batch,
            "generate": {"new_tokens": args.generate, "budget": args.generate_budget, "rounds": args.generate_rounds,
                         "prompt_len": args.prompt_len},
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "bandwidth": bandwidth,
            "runtime_s": round(time.perf_counter() - t_start, 1),
            "cost_table_note": "predicted_ms: mean over timed steps of the per-action median step latency measured in this run",
        }
        table = ""
        if complete:
            meta["acceptance"] = acceptance(rows, space)
            print()
            table = print_table(rows, meta)
        paths = write_outputs(Path(args.out), stem, meta, rows, table)
        if complete:
            for path in paths:
                print(f"written {path}")
        return meta

    configs = [(b, c, False) for b in args.batch for c in args.contexts]
    configs += [(b, c, True) for b in args.mixed_batch for c in (args.mixed_contexts or args.contexts)]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch, context, mixed in configs:
            print(f"{threads} thread(s), batch {batch}{' mixed' if mixed else ''}, context {context} "
                  f"(load average {os.getloadavg()[0]:.2f}):", flush=True)
            cfg = Config(args, sol, model, floor, device, batch, context, mixed=mixed)
            cfg.run(actions)
            rows += cfg.rows
            save(complete=False)
        if args.generate:
            print(f"{threads} thread(s), generate (load average {os.getloadavg()[0]:.2f}):", flush=True)
            rows += run_generate(args, sol, model, device)
            save(complete=False)
    meta = save(complete=True)
    print(f"total {meta['runtime_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(bench_cli.run(main, "decode.py"))
