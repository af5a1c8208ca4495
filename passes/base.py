"""Pass infrastructure: each pass is a class with a stable `uuid` (hash of its source), so a compile
cache keyed by the pass list invalidates whenever any pass changes."""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field

import torch.fx as fx

from runtime.actions import ActionSpace


@dataclass
class AttentionSite:
    layer: int
    module: str  # nn_module_stack path of the attention module
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float


@dataclass
class MLPSite:
    layer: int
    module: str
    kind: str  # see runtime.ops.reference.MLP_KINDS
    act: str
    d_in: int
    d_hidden: int


@dataclass
class PassContext:
    """What passes share: the action space and what earlier passes found or inserted."""

    space: ActionSpace
    action_levels: dict[str, fx.Node] = field(default_factory=dict)  # axis -> [B, T] level node
    positions: fx.Node | None = None
    attention_sites: list[AttentionSite] = field(default_factory=list)
    mlp_sites: list[MLPSite] = field(default_factory=list)
    embedding_weight: str | None = None  # attribute path of the input embedding table


class GraphPass:
    """Rewrites `gm.graph` in place. Subclasses implement `run`."""

    name: str = "pass"

    @classmethod
    def uuid(cls) -> str:
        return hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()[:16]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.run(gm, ctx)
        gm.graph.lint()


def run_passes(gm: fx.GraphModule, passes: list[GraphPass], ctx: PassContext) -> str:
    """Run `passes` in order, drop dead nodes, recompile; returns the combined uuid of the pipeline."""
    for p in passes:
        p(gm, ctx)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return hashlib.sha256("".join(p.uuid() for p in passes).encode()).hexdigest()[:16]
