"""SOLModel: the base model's rewritten graph plus the action space, as one nn.Module.

    logits, hidden = sol(input_ids, actions)                       # teacher-forced, fresh cache
    cache = sol.new_cache(batch, max_len)
    sol(prompt, actions, position_ids=arange(T), cache=cache)      # prefill
    sol(next_ids, step_actions, position_ids=pos, cache=cache)     # one cached decode step

Every call runs the same graph: T new tokens at `position_ids`, attending to everything the cache holds
at earlier positions. That is why teacher forcing and decoding agree (DESIGN invariant 3). The graph's
calling convention is `sol.signature` (runtime/signature.py). Decoding (generate, score) goes through
runtime/stepper.py on `sol.dispatcher`, which keeps its variants and cache across calls.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from runtime import hf_adapter
from runtime.actions import ActionSpace
from runtime.generate import generate, score
from runtime.kv_cache import CacheSpec, StaticKVCache
from runtime import validation
from runtime.signature import StepSignature


class SOLOutput(NamedTuple):
    logits: Tensor  # [B, T, vocab]
    hidden: Tensor  # [B, T, d_model] last-layer hidden state (the policy's input)


class SOLModel(nn.Module):
    def __init__(
        self,
        graph: fx.GraphModule,
        space: ActionSpace,
        cache_specs: list[CacheSpec],
        info: dict,
    ):
        super().__init__()
        self.graph = graph
        self.space = space
        self.cost_table = None  # runtime.costs.CostTable once measured (calibrate_costs) or loaded
        # runtime.cost_model.MeasuredCostModel once calibrated (calibrate_cost_model) or loaded: what a
        # cost budget is priced with; None = the analytic bytes model
        self.cost_model = None
        # The frozen base model the graph shares its weights with (what export writes). Kept out of
        # the module tree so state_dict/.to() see every weight once, through the graph.
        object.__setattr__(self, "base_model", None)
        self.cache_specs = cache_specs
        self.info = info  # sites found, pass pipeline uuid, max_seq_len, dtype
        self.signature = StepSignature.for_layers(len(cache_specs))
        self.signature.check(graph)
        object.__setattr__(self, "_dispatcher", None)  # made on first use (see `dispatcher`)

    @property
    def dtype(self) -> torch.dtype:
        return self.info["dtype"]

    @property
    def token_embedding(self) -> Tensor:
        """The base model's input embedding table [vocab, d] (the graph's own, not a copy)."""
        return self.graph.get_parameter(self.info["embedding_weight"])

    @property
    def max_seq_len(self) -> int:
        return self.info["max_seq_len"]

    def new_cache(self, batch: int, max_len: int | None = None, device=None) -> StaticKVCache:
        max_len = self.max_seq_len if max_len is None else max_len
        if max_len > self.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the compiled max_seq_len={self.max_seq_len}")
        device = device or self.graph.solc_action_levels.device
        return StaticKVCache(self.cache_specs, batch, max_len, self.dtype, device)

    def dense_actions(self, batch: int, seq: int, device=None) -> Tensor:
        return torch.full((batch, seq), self.space.dense_index, dtype=torch.long, device=device)

    @property
    def eos_token_ids(self) -> list[int]:
        """The base model's EOS ids (its generation config); [] when unknown."""
        return [] if self.base_model is None else hf_adapter.eos_token_ids(self.base_model)

    @property
    def dispatcher(self):
        """The model's own StepDispatcher (variants and caches kept across generate/score calls); a
        new one when the model moved to another device."""
        from runtime.dispatch import StepDispatcher

        device = self.graph.solc_action_levels.device
        held = self._dispatcher
        if held is None or held[0] != device:
            held = (device, StepDispatcher(self))
            object.__setattr__(self, "_dispatcher", held)
        return held[1]

    def generate(self, input_ids, **kwargs):
        """See runtime.generate.generate: tokens, the action of every generated token, realized budget."""
        return generate(self, input_ids, **kwargs)

    def score(self, tokens: Tensor, prompt_len: int, **kwargs):
        """See runtime.generate.score: log-probs of given tokens, each under the action of its step."""
        return score(self, tokens, prompt_len, **kwargs)

    def forward(
        self,
        input_ids: Tensor,
        actions: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: StaticKVCache | None = None,
    ) -> SOLOutput:
        validation.check_forward(self, input_ids, actions, position_ids, cache)
        batch, seq = input_ids.shape
        if actions is None:
            actions = self.dense_actions(batch, seq, input_ids.device)
        if position_ids is None:
            if cache is not None:
                raise ValueError("position_ids is required with a cache (where do the new tokens go?)")
            position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        if cache is None:
            cache = StaticKVCache(self.cache_specs, batch, seq, self.dtype, input_ids.device)
        logits, hidden = self.graph(*self.signature.args(input_ids, position_ids, actions, cache))
        return SOLOutput(logits, hidden)
