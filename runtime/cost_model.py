"""Cost models: what one decode step under an action costs, relative to the dense step, at a context length.

DESIGN.md "Budget": a cost budget is one number, the fraction of the dense decode cost a schedule may spend,

    realized = sum_t cost(a_t, kv_len_t) / sum_t cost(dense, kv_len_t)      over controlled steps.

Two models share one interface (`step_cost(action, kv_len)` in arbitrary units, dense included):

  BytesCostModel     analytic bytes a batch-1 decode step reads (device independent): every weight at
                     its storage precision, the kept MLP input rows of gate/up, the kept KV pages plus the
                     page metadata read to score them, one embedding row and the LM head.
  MeasuredCostModel  a calibrated table of step latency per action and context bucket, on one device at
                     one batch size; between buckets the latency is interpolated linearly in kv_len. It may
                     also carry `decision_ms`, what one decision of the policy it was calibrated with costs
                     between two decode steps: a budget prices the actions that ran (the policy's choice),
                     the wall-time prediction of a policy-driven loop adds the decisions (`predicted_decode_ms`).

Both are small versioned dicts (torchao's config convention) so they travel in the export manifest, and
`realized_cost` prices a schedule that ran. Pure arithmetic over the model's shapes: no torch.library, no HF.
"""
from __future__ import annotations

import bisect
import functools
import math
import platform
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor

from runtime.actions import Action
from runtime.errors import ArgumentError, SolcError
from runtime.ops.reference import PAGE_SIZE, keep_count

VERSION = 1
INT4_GROUP = 32  # default int4 group size (DESIGN: 32, or the largest of 128/64/32 dividing every in-dim)


class CostModelError(SolcError):
    """A cost model is used outside what it was made for (another device or batch, a budget out of range)."""


class CostBudgetError(CostModelError, ArgumentError):
    """A cost budget out of the feasible range or of the wrong form: a CostModelError that also names its
    argument (an ArgumentError, so a ValueError), like every other bad argument."""


@dataclass(frozen=True)
class LayerShape:
    """The per-layer shapes a step's bytes depend on."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    d_hidden: int
    mlp_kind: str  # "gated" | "gated_fused" | "plain"


@dataclass
class BytesCostModel:
    layers: list[LayerShape]
    vocab: int
    weight_bytes: int  # bytes per element of the model's weights and KV cache (fp32: 4)
    quant_mode: str = "weight"  # "weight": bits < 16 store the MLP weights in that many bits
    int4_group: int = INT4_GROUP
    kind: str = "bytes"
    version: int = VERSION

    @classmethod
    def for_model(cls, sol, quant_mode: str | None = None) -> "BytesCostModel":
        """Shapes from a compiled SOLModel's sites (what the passes found)."""
        att, mlp = sol.info["attention_sites"], sol.info["mlp_sites"]
        layers = [
            LayerShape(a.n_heads, a.n_kv_heads, a.head_dim, m.d_in, m.d_hidden, m.kind) for a, m in zip(att, mlp)
        ]
        mode = quant_mode or getattr(sol.space, "quant_mode", None) or sol.info.get("quant", "activation")
        vocab = sol.token_embedding.shape[0]
        return cls(layers, int(vocab), torch.finfo(sol.dtype).bits // 8, str(mode))

    # -- bytes of one step ---------------------------------------------------------------------------
    def _mlp_bytes(self, layer: LayerShape, mlp_keep: float, bits: int) -> float:
        n_in = 2 if layer.mlp_kind in ("gated", "gated_fused") else 1
        rows = keep_count(mlp_keep, layer.d_model)  # kept input channels: rows of W_in^T read
        in_elems = rows * n_in * layer.d_hidden
        out_elems = layer.d_hidden * layer.d_model
        if self.quant_mode != "weight" or bits >= 16:
            return (in_elems + out_elems) * self.weight_bytes
        if bits == 8:  # int8 per output channel: one fp32 scale per output feature
            scales = (n_in * layer.d_hidden + layer.d_model) * 4
            return in_elems + out_elems + scales
        # int4 groupwise along the input dim: scale + zero (bf16 each) per group of each output feature
        groups_in = math.ceil(rows / self.int4_group) * n_in * layer.d_hidden
        groups_out = math.ceil(layer.d_hidden / self.int4_group) * layer.d_model
        return (in_elems + out_elems) / 2 + (groups_in + groups_out) * 4

    def _attention_bytes(self, layer: LayerShape, attn_keep: float, kv_len: int) -> float:
        proj = (2 * layer.n_heads + 2 * layer.n_kv_heads) * layer.head_dim * layer.d_model
        pages = -(-kv_len // PAGE_SIZE)
        if attn_keep >= 1.0:
            kv_tokens, metadata = kv_len, 0
        else:
            # Quest: score every page from its min/max key (2 * head_dim per page), read the kept pages.
            # Each query head picks its own pages; counted per KV head (the union can be larger with GQA).
            kept_pages = min(-(-keep_count(attn_keep, kv_len) // PAGE_SIZE), pages)
            kv_tokens, metadata = min(kept_pages * PAGE_SIZE, kv_len), pages * 2 * layer.head_dim
        kv = 2 * kv_tokens * layer.head_dim + metadata
        return (proj + layer.n_kv_heads * kv) * self.weight_bytes

    def step_cost(self, action: Action, kv_len: int) -> float:
        """Bytes read by one batch-1 decode step under `action` with `kv_len` keys (incl. the new one)."""
        if kv_len < 1:
            raise CostModelError(f"kv_len must be >= 1, got {kv_len}")
        d = self.layers[0].d_model
        total = (d + self.vocab * d) * self.weight_bytes  # the fed token's embedding row + the LM head
        for layer in self.layers:
            total += self._attention_bytes(layer, action.attn, kv_len)
            total += self._mlp_bytes(layer, action.mlp, action.bits)
        return float(total)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(layer) for layer in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BytesCostModel":
        _check_version(d, "bytes")
        body = {k: v for k, v in d.items() if k not in ("kind", "version")}
        body["layers"] = [LayerShape(**layer) for layer in body["layers"]]
        return cls(**body)


@dataclass
class MeasuredCostModel:
    device: str
    batch: int
    contexts: list[int]  # context buckets (kv_len), ascending
    latency_ms: list[list[float]]  # [action][bucket] median step latency
    # Median latency of one decision of a policy network between two decode steps (its forward and its
    # bookkeeping, weights cold after the step streamed the model's), or None when no policy was timed.
    decision_ms: float | None = None
    kind: str = "measured"
    version: int = VERSION

    def __post_init__(self):
        if list(self.contexts) != sorted(set(self.contexts)) or not self.contexts:
            raise CostModelError(f"contexts must be distinct and ascending, got {self.contexts}")
        if any(len(row) != len(self.contexts) for row in self.latency_ms):
            raise CostModelError("latency_ms needs one value per context bucket for every action")
        ok = self.decision_ms is None or (
            isinstance(self.decision_ms, (int, float)) and not isinstance(self.decision_ms, bool)
            and math.isfinite(self.decision_ms) and self.decision_ms >= 0)
        if not ok:
            raise CostModelError(f"decision_ms must be None or a finite number >= 0, got {self.decision_ms!r}")

    def step_cost_index(self, action_index: int, kv_len: int) -> float:
        row = self.latency_ms[action_index]
        c = self.contexts
        if kv_len <= c[0]:
            return row[0]
        if kv_len >= c[-1]:
            return row[-1]
        i = bisect.bisect_right(c, kv_len)
        w = (kv_len - c[i - 1]) / (c[i] - c[i - 1])
        return row[i - 1] * (1 - w) + row[i] * w

    def check(self, device: str, batch: int, force: bool = False) -> None:
        """Refuse to price steps on another device or batch size than the table was measured on."""
        if force:
            return
        if device != self.device or batch != self.batch:
            raise CostModelError(
                f"this cost table was measured on {self.device!r} at batch {self.batch}, not on {device!r} at "
                f"batch {batch}; recalibrate (solc.calibrate_cost_model(sol, batch={batch})) or pass force=True"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MeasuredCostModel":
        _check_version(d, "measured")
        return cls(**{k: v for k, v in d.items() if k not in ("kind", "version")})


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows. Read once: every
    generate priced by a measured table asks for it, and the file grows with the core count."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device) -> str:
    """What a measured table is tied to: the GPU's name, or the CPU's model and the thread count (a
    table measured on another CPU model is refused like one from another GPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_name()} ({torch.get_num_threads()} threads)"


def _check_version(d: dict, kind: str) -> None:
    if not isinstance(d, dict) or d.get("kind") != kind:
        raise CostModelError(f"expected a {kind!r} cost model dict, got kind={d.get('kind') if isinstance(d, dict) else d!r}")
    if d.get("version") != VERSION:
        raise CostModelError(f"{kind} cost model version {d.get('version')!r} is not supported (expected {VERSION})")


def cost_model_from_dict(d: dict):
    kinds = {"bytes": BytesCostModel, "measured": MeasuredCostModel}
    if not isinstance(d, dict) or d.get("kind") not in kinds:
        raise CostModelError(f"unknown cost model kind {d.get('kind') if isinstance(d, dict) else d!r}; valid: {list(kinds)}")
    return kinds[d["kind"]].from_dict(d)


def relative_costs(model, actions: Sequence[Action], kv_lens: Sequence[int]) -> Tensor:
    """float64 [len(kv_lens), A]: cost of each action relative to the dense action (the last) per kv_len."""
    out = torch.empty(len(kv_lens), len(actions), dtype=torch.float64)
    for j, n in enumerate(kv_lens):
        if isinstance(model, MeasuredCostModel):
            raw = [model.step_cost_index(i, n) for i in range(len(actions))]
        else:
            raw = [model.step_cost(a, n) for a in actions]
        dense = raw[-1] if actions[-1].is_dense else model.step_cost(Action(), n)
        out[j] = torch.tensor(raw, dtype=torch.float64) / dense
    return out


def realized_cost(model, actions: Sequence[Action], schedule: Tensor, kv_lens: Tensor, controlled: Tensor) -> Tensor:
    """Per row: sum_t cost(a_t, kv_len_t) / sum_t cost(dense, kv_len_t) over controlled steps.

    schedule [B, N] action indices; kv_lens [B, N] keys each step attended (incl. its own); controlled
    [B, N] bool. Rows without a controlled step give NaN. Costs are in the model's units, so the ratio
    weighs a long-context step by what it really costs, not as one step among equals."""
    n_actions = len(actions)
    dense_index = n_actions - 1
    spent = torch.zeros(schedule.shape[0], dtype=torch.float64)
    full = torch.zeros(schedule.shape[0], dtype=torch.float64)
    cache: dict[tuple[int, int], float] = {}

    def cost(i: int, n: int) -> float:
        if (i, n) not in cache:
            cache[(i, n)] = (
                model.step_cost_index(i, n) if isinstance(model, MeasuredCostModel) else model.step_cost(actions[i], n)
            )
        return cache[(i, n)]

    sched, lens, ctrl = schedule.cpu().tolist(), kv_lens.cpu().tolist(), controlled.cpu().tolist()
    for b, (row_a, row_n, row_c) in enumerate(zip(sched, lens, ctrl)):
        for a, n, c in zip(row_a, row_n, row_c):
            if c:
                spent[b] += cost(a, n)
                full[b] += cost(dense_index, n)
    return torch.where(full > 0, spent / full, torch.full_like(full, float("nan")))


def predicted_decode_ms(model: MeasuredCostModel, schedule: Sequence[int], kv_lens: Sequence[int],
                        decisions: int = 0) -> float:
    """Predicted wall time (ms) of one row's decode loop: the table's latency of every step that ran
    (action schedule[t] with kv_lens[t] keys; forced-dense steps included, -1 = nothing ran) plus
    `decisions` policy decisions at the table's decision_ms (an error if the table has none)."""
    if not isinstance(model, MeasuredCostModel):
        raise CostModelError(f"predicted_decode_ms needs a measured cost model, got {type(model).__name__}")
    if len(schedule) != len(kv_lens):
        raise CostModelError(f"schedule and kv_lens differ in length ({len(schedule)} vs {len(kv_lens)})")
    if decisions and model.decision_ms is None:
        raise CostModelError("this cost table has no decision_ms: calibrate it with the policy "
                             "(solc.calibrate_cost_model(sol, policy=...)) to price the policy's decisions")
    steps = sum(model.step_cost_index(int(a), int(n)) for a, n in zip(schedule, kv_lens) if int(a) >= 0)
    return float(steps + decisions * (model.decision_ms or 0.0))


def feasible_range(model, actions: Sequence[Action], kv_len: int) -> tuple[float, float]:
    """(cheapest action's relative cost, 1.0) at `kv_len`: the budgets a schedule can realize there."""
    rel = relative_costs(model, actions, [kv_len])[0]
    return float(rel.min()), 1.0


def check_budget(budget: float, model, actions: Sequence[Action], kv_len: int) -> float:
    """A cost budget must lie in the feasible range; the error names it."""
    low, high = feasible_range(model, actions, kv_len)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not low - 1e-9 <= float(budget) <= high:
        raise CostModelError(
            f"budget={budget!r} is outside the feasible cost range [{low:.3f}, {high:.1f}] at kv_len={kv_len} "
            f"(the cheapest action costs {low:.3f} of a dense step there)"
        )
    return float(budget)
