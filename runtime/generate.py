"""generate() and score(): thin drivers over the Stepper (runtime/stepper.py holds the protocol).

generate: each row's prompt minus its last token is prefilled densely; controlled step t feeds the
previous token (at first the last prompt token) and its logits give generated token t, so
`actions[:, t]` is the action that produced token t. score: the same steps along given tokens.
Prompts may differ in length: a left-padded batch with its `attention_mask` (the HF convention) or a
list of prompts; every row decodes as its prompt alone would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from runtime import validation
from runtime.budget import is_cost_request, resolve_budget
from runtime.costs import realized_budget
from runtime.dispatch import StepDispatcher
from runtime.errors import ArgumentError, ArgumentTypeError
from runtime.ops import cpu_sample
from runtime.schedulers import ActionSource, seeded, uniforms
from runtime.stepper import PREFILL_CHUNK, Stepper, budget_targets, collector_paused, resolve_source  # noqa: F401  (re-exported)


@dataclass
class GenerateOutput:
    tokens: Tensor  # [B, P + N]: prompt (left-padded) then generated tokens (pad_token_id, default the first EOS id, after a row finished)
    actions: Tensor  # [B, N]: action index that produced each generated token (-1 after finish)
    logprobs: Tensor  # [B, N]: log p of each token under its action (0 after finish); the model's dtype, >= fp32
    controlled: Tensor  # [B, N] bool: counted in the budget (not forced dense, not after finish)
    budget: dict  # realized mean cost per axis over controlled steps, and net_keep over enabled axes
    attention_mask: Tensor | None = None  # [B, P + N]: 0 on the left padding of a shorter prompt

    def row_budget(self, space) -> Tensor:
        """[B, 3] realized per-axis cost of each row (NaN for a row without controlled steps)."""
        return realized_budget(space, self.actions, self.controlled, empty=float("nan"))


def _eos_ids(sol, eos_token_id) -> list[int]:
    """The EOS ids generate stops at: the model's generation config when None, [] to never stop."""
    if eos_token_id is None:
        return list(sol.eos_token_ids)
    eos_token_id = validation.as_python(eos_token_id)
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


def _ragged_prompts(input_ids, attention_mask, pad_token_id: int) -> tuple[Tensor, list[int], Tensor, Tensor]:
    """(packed [B, L]: each row's tokens first, then padding; lengths; the prompt block of the output
    [B, L] (left-padded); its attention mask)."""
    if isinstance(input_ids, Tensor):
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ArgumentError("input_ids", f"input_ids must be [batch, prompt_len >= 1], got shape {tuple(input_ids.shape)}")
        batch, width = input_ids.shape
        if attention_mask is None:
            return input_ids, [width] * batch, input_ids, torch.ones_like(input_ids)
        mask = torch.as_tensor(attention_mask, device=input_ids.device).long()
        if mask.shape != input_ids.shape:
            raise ArgumentError("attention_mask", f"attention_mask has shape {tuple(mask.shape)}; input_ids has {tuple(input_ids.shape)}")
        lengths = mask.sum(1).tolist()
        left = torch.arange(width, device=mask.device)[None] >= (width - mask.sum(1))[:, None]
        if not torch.equal(mask.bool(), left) or min(lengths) < 1:
            raise ArgumentError("attention_mask", "attention_mask must be left-padded (each row: zeros, then at least one 1), "
                                "as HF generate expects")
        packed = torch.stack([torch.roll(input_ids[r], -(width - n)) for r, n in enumerate(lengths)])
        return packed, lengths, input_ids, mask
    if attention_mask is not None:
        raise ArgumentError("attention_mask", "attention_mask goes with a padded input_ids tensor, not with a list of prompts")
    prompts = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in input_ids]
    if not prompts or any(p.numel() < 1 for p in prompts):
        raise ArgumentError("input_ids", "input_ids as a list needs at least one prompt, each of at least one token")
    lengths = [p.numel() for p in prompts]
    width = max(lengths)
    device = prompts[0].device
    packed = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    shown = packed.clone()
    for r, p in enumerate(prompts):
        packed[r, : p.numel()] = p
        shown[r, width - p.numel():] = p
    mask = (torch.arange(width, device=device)[None] >= torch.tensor([width - n for n in lengths], device=device)[:, None]).long()
    return packed, lengths, shown, mask


class _Sampler:
    """generate's sampling step. Greedy at temperature 0; else inverse-CDF sampling with one uniform per
    row drawn on the host from `generator` (one for the batch, or one per row: runtime.schedulers.seeded),
    reproducible from the seed, and no device-to-host read. Its [B, V] temporaries (the tempered logits,
    their fp64 copy, softmax and CDF) are kept from step to step: made fresh, ~20 MB a step at batch 16,
    their page faults took longer than the arithmetic (10.7 ms against 1.6 for [16, 49152] on the dev
    machine). The kernels are those of the one-shot form, so are the bits."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None, generator):
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self._buffers: tuple[Tensor, ...] | None = None

    def _held(self, logits: Tensor) -> tuple[Tensor, ...]:
        held = self._buffers
        if held is None or held[0].shape != logits.shape or held[0].dtype != logits.dtype or held[0].device != logits.device:
            wide = dict(dtype=torch.float64, device=logits.device)
            held = self._buffers = (torch.empty_like(logits), torch.empty(logits.shape, **wide),
                                    torch.empty(logits.shape, **wide), torch.empty(logits.shape, **wide))
        return held

    def __call__(self, logits: Tensor) -> Tensor:
        if self.temperature == 0:
            return logits.argmax(-1)
        scaled, wide, probs, cdf = self._held(logits)
        # Shift the row's largest logit to 0 before dividing: a tiny temperature then sends the others to
        # -inf (probability 0), never the largest to +inf (1e-39 made every token NaN, then the last id).
        # Below the dtype's smallest normal the temperature would round to 0 (0 / 0): use that instead.
        torch.sub(logits, logits.amax(-1, keepdim=True), out=scaled)
        scaled.div_(max(self.temperature, torch.finfo(scaled.dtype).tiny))
        if self.top_k is not None:
            kth = torch.topk(scaled, min(self.top_k, scaled.shape[-1]), dim=-1).values[..., -1:]
            scaled.masked_fill_(scaled < kth, float("-inf"))
        if self.top_p is not None:
            cpu_sample.mask_top_p_(scaled, self.top_p)  # on CPU in C, without sorting the vocabulary
        wide.copy_(scaled)
        torch.ops.aten._softmax.out(wide, -1, False, out=probs)  # torch.softmax's kernel
        torch.cumsum(probs, -1, out=cdf)
        u = 1.0 - uniforms(self.generator, logits.shape[0])[:, None]  # in (0, 1]: never a zero-probability token
        picked = torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:]).squeeze(-1)
        return picked.clamp(max=logits.shape[-1] - 1)


def _sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator) -> Tensor:
    """One sampling step (`_Sampler`, without buffers kept for a next one)."""
    return _Sampler(temperature, top_k, top_p, generator)(logits)


@torch.no_grad()
def generate(
    sol,
    input_ids,
    policy: ActionSource | None = None,
    schedule: Tensor | None = None,
    budget=None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | Sequence[int] = 0,
    dispatcher: StepDispatcher | None = None,
    attention_mask: Tensor | None = None,
    pad_token_id: int | None = None,
    budget_mode: str | None = None,
    force: bool = False,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
) -> GenerateOutput:
    """Generate `max_new_tokens` per row. Who picks the actions: `policy` (an ActionSource: a trained
    policy or a baseline), else `schedule` ([B, N] or [N] action indices), else Fixed at `budget`,
    else dense. `budget` (default 1.0) is also what the policy is asked to meet: one number is a cost
    fraction of the dense decode step under the model's cost model (its measured one when calibrated,
    else the bytes model); a dict over axes or three numbers, or budget_mode="per-axis", is the paper's
    per-axis budget. Without a policy, a cost budget runs the static mix of the two actions around it
    (runtime.schedulers.cost_fixed); a per-axis one runs Fixed. A measured cost model calibrated for
    another device or batch is refused unless force=True. Greedy when
    temperature == 0, else sampling with optional top_k / top_p, reproducible from `seed`: one int (one
    random stream for the batch, as HF's generate) or one int per row (a row's sampled tokens and a
    sampled policy's actions then do not depend on its batch mates: the row alone with its seed gives
    the same).

    input_ids: [B, P] (left-padded with `attention_mask` when prompts differ in length) or a list of
    prompts (token lists or 1-D tensors; the output is left-padded with `pad_token_id`, default the
    first EOS id, and carries its attention_mask). A row stops at EOS and shows `pad_token_id` (default
    the first EOS id, as HF) at every later position: `eos_token_id` (an id or a
    list), by default the model's generation config; [] never stops. `stop_strings` (with the
    `tokenizer` that decodes the tokens, as in HF's generate): a row also stops once its generated text
    holds one of them (the token that completes it is kept; text spanning several tokens counts). A
    stopped row's later steps do not run and count in no budget. Reuses the model's dispatcher and cache
    across calls unless `dispatcher` is given."""
    validation.check_generate(sol, input_ids, policy, schedule, budget, max_new_tokens, temperature, top_k, top_p,
                              eos_token_id, seed, attention_mask, pad_token_id,
                              cost_budget=is_cost_request(policy, budget, budget_mode))
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stops = _stop_strings(stop_strings, tokenizer)
    eos = _eos_ids(sol, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    packed, lengths, shown, mask = _ragged_prompts(input_ids, attention_mask, pad)
    batch, steps = packed.shape[0], max_new_tokens
    if max(lengths) + steps - 1 > sol.max_seq_len:
        raise ValueError(f"prompt ({max(lengths)}) + new tokens ({steps}) exceeds max_seq_len={sol.max_seq_len}")
    device = sol.token_embedding.device
    packed = packed.to(device)
    generator = seeded(seed, batch)
    source, spec = resolve_budget(sol, policy, schedule, budget, budget_mode, steps, batch, force=force)
    stepper = Stepper(sol, source, dispatcher, spec)
    stepper.prefill(packed, steps, lengths=[n - 1 for n in lengths], targets=1.0 if budget is None else budget,
                    generator=generator)
    feed = packed.gather(1, torch.tensor(lengths, device=device)[:, None] - 1)[:, 0]
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    pad_t = torch.tensor(pad, dtype=torch.long, device=device)  # what a finished row shows (HF's fill)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    sample = _Sampler(temperature, top_k, top_p, generator)
    new, logps = [], []
    stopping = bool(eos or stops)
    texts = _StopWatch(stops, tokenizer, batch) if stops else None
    with collector_paused():
        for _ in range(steps):
            out = stepper.step(feed, active=~finished if stopping else None)
            if out is None:  # every row has finished
                break
            nxt = sample(out.logits)
            logp = out.logprob(nxt)
            if stopping:
                nxt = torch.where(finished, pad_t, nxt)
                logp = torch.where(finished, torch.zeros_like(logp), logp)
                done = torch.isin(nxt, eos_t)
                if texts is not None:
                    done = done | texts.stopped(nxt, finished).to(device)
                finished = finished | done
            new.append(nxt)
            logps.append(logp)
            feed = nxt
    new_tokens = torch.stack(new, 1)
    tokens = torch.cat([shown.to(device), new_tokens], 1)
    full_mask = torch.cat([mask.to(device), torch.ones_like(new_tokens)], 1)
    return GenerateOutput(tokens, stepper.actions, torch.stack(logps, 1), stepper.controlled, stepper.budget_summary(),
                          full_mask)


def _stop_strings(stop_strings, tokenizer) -> list[str]:
    if stop_strings is None:
        return []
    stops = [stop_strings] if isinstance(stop_strings, str) else stop_strings
    if not isinstance(stops, (list, tuple)) or not stops or not all(isinstance(x, str) and x for x in stops):
        raise ArgumentTypeError("stop_strings", f"stop_strings={stop_strings!r} is invalid: a non-empty string or "
                                                "a non-empty list of them")
    if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
        raise ArgumentError("tokenizer", f"stop_strings need the tokenizer that decodes the tokens (tokenizer="
                                         f"{tokenizer!r}): pass tokenizer=, as in HF's generate")
    return list(stops)


class _StopWatch:
    """Each row's generated text so far, to see a stop string appear (it may span several tokens; it is
    looked for only in what the row generated, never in its prompt)."""

    def __init__(self, stops: list[str], tokenizer, batch: int):
        self.stops, self.tokenizer = stops, tokenizer
        self.ids: list[list[int]] = [[] for _ in range(batch)]

    def stopped(self, nxt: Tensor, finished: Tensor) -> Tensor:
        out = torch.zeros(len(self.ids), dtype=torch.bool)
        for row, (token, done) in enumerate(zip(nxt.tolist(), finished.tolist())):
            if done:
                continue
            self.ids[row].append(token)
            text = self.tokenizer.decode(self.ids[row])
            out[row] = any(stop in text for stop in self.stops)
        return out


@torch.no_grad()
def score(
    sol,
    tokens: Tensor,
    prompt_len: int,
    policy: ActionSource | None = None,
    schedule: Tensor | None = None,
    budget=None,
    seed: int | Sequence[int] = 0,
    dispatcher: StepDispatcher | None = None,
    budget_mode: str | None = None,
    force: bool = False,
    attention_mask: Tensor | None = None,
) -> GenerateOutput:
    """Decode the given `tokens` [B, L] (teacher forcing through the runtime): the first `prompt_len`
    are the prompt, each later token is scored by the controlled step that produces it. `budget`,
    `budget_mode`, `force` and `seed` (a sampled policy's or Random's draws) mean what they mean in
    `generate`. attention_mask [B, L]: left padding of shorter prompts (zeros, then ones; ones from
    `prompt_len` on), e.g. a ragged generate's output and its attention_mask: each row is then scored
    as its own prompt alone would be. Every token after the prompt is scored, a fill after EOS too."""
    validation.check_score(sol, tokens, prompt_len, policy, schedule, budget, seed,
                           cost_budget=is_cost_request(policy, budget, budget_mode))
    if not 1 <= prompt_len < tokens.shape[1]:
        raise ValueError(f"prompt_len must be in 1..{tokens.shape[1] - 1}, got {prompt_len}")
    device = sol.token_embedding.device
    tokens = tokens.to(device)
    steps = tokens.shape[1] - prompt_len
    prompts, lengths = tokens[:, : prompt_len - 1], None
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask, device=device)
        if mask.shape != tokens.shape:
            raise ArgumentError("attention_mask", f"attention_mask has shape {tuple(mask.shape)}; tokens has "
                                                  f"{tuple(tokens.shape)}")
        if not bool((mask[:, prompt_len:] == 1).all()):
            raise ArgumentError("attention_mask", "attention_mask must be 1 on every scored token (from prompt_len "
                                                  "on): padding goes on the left of the prompt")
        prompts, lengths, _, _ = _ragged_prompts(tokens[:, :prompt_len], mask[:, :prompt_len], 0)
        lengths = [n - 1 for n in lengths]  # the prefill stops before each prompt's last token: step 0 feeds it
    source, spec = resolve_budget(sol, policy, schedule, budget, budget_mode, steps, tokens.shape[0], force=force)
    stepper = Stepper(sol, source, dispatcher, spec)
    stepper.prefill(prompts, steps, lengths=lengths, targets=1.0 if budget is None else budget,
                    generator=seeded(seed, tokens.shape[0]))
    with collector_paused():
        logps = [stepper.step(tokens[:, prompt_len - 1 + t]).logprob(tokens[:, prompt_len + t]) for t in range(steps)]
    return GenerateOutput(tokens, stepper.actions, torch.stack(logps, 1), stepper.controlled, stepper.budget_summary())
