"""generate(): dense prefill, then one controlled decode step per new token.

Step protocol (the same one training episodes score): the prompt minus its last token is prefilled
densely; controlled step t feeds the previous token (at first the last prompt token) with the action
the source picked, and its logits give generated token t. So every generated token's distribution
came from exactly one action, and `actions[:, t]` is that action. Positions below DENSE_PREFIX always
run dense and count in no budget. The realized budget is computed from the actions that ran.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from runtime import validation
from runtime.actions import AXES
from runtime.dispatch import StepDispatcher
from runtime.schedulers import DENSE_PREFIX, ActionSource, Fixed, Schedule


@dataclass
class GenerateOutput:
    tokens: Tensor  # [B, P + N]: prompt then generated tokens (eos repeated after a row finished)
    actions: Tensor  # [B, N]: action index that produced each generated token (-1 after finish)
    logprobs: Tensor  # [B, N]: log p of each generated token under its action (0 after finish)
    controlled: Tensor  # [B, N] bool: counted in the budget (not forced dense, not after finish)
    budget: dict  # realized mean cost per axis over controlled steps, and net_keep over enabled axes

    def row_budget(self, cost_table: Tensor) -> Tensor:
        """[B, 3] realized per-axis cost of each row (NaN for a row without controlled steps)."""
        costs = cost_table.to(self.actions.device)[self.actions.clamp(min=0)]  # [B, N, 3]
        weight = self.controlled.to(costs.dtype)[..., None]
        return (costs * weight).sum(1) / weight.sum(1)


def budget_targets(budget, batch: int) -> Tensor:
    """A budget as [B, 3] per-axis cost targets: one number for all axes, a dict per axis, or [3]/[B, 3]."""
    if isinstance(budget, dict):
        unknown = set(budget) - set(AXES)
        if unknown:
            raise ValueError(f"budget has unknown axes {sorted(unknown)}; valid axes: {list(AXES)}")
        budget = [float(budget.get(axis, 1.0)) for axis in AXES]
    t = torch.as_tensor(budget, dtype=torch.float64)
    if t.dim() == 0:
        t = t.repeat(3)
    t = t.expand(batch, 3) if t.dim() == 1 else t
    if t.shape != (batch, 3) or not bool(((t > 0) & (t <= 1)).all()):
        raise ValueError(f"budget must be in (0, 1] (a number, a per-axis dict, [3] or [{batch}, 3]); got {budget!r}")
    return t


def _sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits.float(), -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


PREFILL_CHUNK = 512  # bounds the [B, H, chunk, kv_len] attention scores of long prompts


@torch.no_grad()
def prefill(sol, ids: Tensor, cache, start: int = 0, chunk: int = PREFILL_CHUNK) -> Tensor:
    """Dense prefill of ids [B, L] at positions start.. in chunks; returns the last hidden state [B, d]."""
    batch, length = ids.shape
    for lo in range(0, length, chunk):
        hi = min(lo + chunk, length)
        pos = torch.arange(start + lo, start + hi, device=ids.device).expand(batch, hi - lo)
        hidden = sol(ids[:, lo:hi], None, pos, cache).hidden
    return hidden[:, -1]


def _controlled_steps(sol, input_ids, policy, schedule, budget, steps, next_token, eos_token_id, seed, dispatcher):
    """The shared decode loop: prefill input_ids[:, :-1] densely, then `steps` controlled steps; the
    token fed after step t is `next_token(t, logits [B, V], generator)`."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, prompt_len >= 1], got shape {tuple(input_ids.shape)}")
    if steps < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {steps}")
    if policy is not None and schedule is not None:
        raise ValueError("pass either policy= or schedule=, not both")
    batch, prompt = input_ids.shape
    total = prompt + steps - 1
    if total > sol.max_seq_len:
        raise ValueError(f"prompt ({prompt}) + new tokens ({steps}) exceeds max_seq_len={sol.max_seq_len}")
    device = input_ids.device
    generator = torch.Generator().manual_seed(seed)
    space = sol.space
    targets = budget_targets(1.0 if budget is None else budget, batch)
    if policy is None:
        policy = Schedule(schedule) if schedule is not None else Fixed() if budget is not None else None
    if policy is None:
        policy = Schedule(torch.full((steps,), space.dense_index))
    policy.reset(space, batch, targets, steps, generator)
    dispatcher = dispatcher or StepDispatcher(sol, mode="eager")

    cache = sol.new_cache(batch, total, device=device)
    if prompt > 1:
        hidden = prefill(sol, input_ids[:, :-1], cache)
    else:
        hidden = torch.zeros(batch, sol.token_embedding.shape[1], dtype=sol.dtype, device=device)

    tokens = [input_ids]
    acts, logps, ctrl = [], [], []
    feed = input_ids[:, -1:]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for t in range(steps):
        pos = prompt - 1 + t
        dense = torch.full((batch,), pos < DENSE_PREFIX, device=device)
        action = policy.next_actions(t, hidden, sol.token_embedding[feed[:, 0]], dense).to(device)
        step_logits, step_hidden = dispatcher.step(feed, action[:, None], torch.full((batch, 1), pos, device=device), cache)
        logits = step_logits[:, -1].float()
        nxt = next_token(t, logits, generator)
        logp = torch.log_softmax(logits, -1).gather(-1, nxt[:, None]).squeeze(-1)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
        acts.append(torch.where(finished, torch.full_like(action, -1), action))
        logps.append(torch.where(finished, torch.zeros_like(logp), logp))
        ctrl.append(~dense & ~finished)
        tokens.append(nxt[:, None])
        hidden, feed = step_hidden[:, -1], nxt[:, None]
        if eos_token_id is not None:
            finished |= nxt == eos_token_id
            if bool(finished.all()):
                break
    actions, controlled = torch.stack(acts, 1), torch.stack(ctrl, 1)
    return GenerateOutput(torch.cat(tokens, 1), actions, torch.stack(logps, 1), controlled, _budget(sol, actions, controlled))


def _budget(sol, actions: Tensor, controlled: Tensor) -> dict:
    space = sol.space
    n = int(controlled.sum())
    costs = space.cost_table().to(actions.device)[actions.clamp(min=0)]  # [B, N, 3]
    mean = {axis: float("nan") if n == 0 else float(costs[..., i][controlled].mean()) for i, axis in enumerate(AXES)}
    mean["net_keep"] = sum(mean[a] for a in space.axes) / len(space.axes)
    if sol.cost_table is not None and n > 0:
        mean["latency"] = sol.cost_table.predict(actions, controlled)  # relative to dense steps
    return mean


@torch.no_grad()
def generate(
    sol,
    input_ids: Tensor,
    policy: ActionSource | None = None,
    schedule: Tensor | None = None,
    budget=None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int = 0,
    dispatcher: StepDispatcher | None = None,
) -> GenerateOutput:
    """Generate `max_new_tokens` per row. Who picks the actions: `policy` (an ActionSource: a trained
    policy or a baseline), else `schedule` ([B, N] or [N] action indices), else Fixed at `budget`,
    else dense. `budget` (default 1.0) is also what the policy is asked to meet. Greedy when
    temperature == 0, else sampling with optional top_k / top_p, reproducible from `seed`."""
    validation.check_generate(sol, input_ids, policy, schedule, budget, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    pick = lambda t, logits, gen: _sample(logits, temperature, top_k, top_p, gen)  # noqa: E731
    return _controlled_steps(sol, input_ids, policy, schedule, budget, max_new_tokens, pick, eos_token_id, seed, dispatcher)


@torch.no_grad()
def score(
    sol,
    tokens: Tensor,
    prompt_len: int,
    policy: ActionSource | None = None,
    schedule: Tensor | None = None,
    budget=None,
    seed: int = 0,
    dispatcher: StepDispatcher | None = None,
) -> GenerateOutput:
    """Decode the given `tokens` [B, L] (teacher forcing through the runtime): the first `prompt_len`
    are the prompt, each later token is scored by the controlled step that produces it."""
    validation.check_score(sol, tokens, prompt_len, policy, schedule, budget, seed)
    if not 1 <= prompt_len < tokens.shape[1]:
        raise ValueError(f"prompt_len must be in 1..{tokens.shape[1] - 1}, got {prompt_len}")
    given = lambda t, logits, gen: tokens[:, prompt_len + t]  # noqa: E731
    steps = tokens.shape[1] - prompt_len
    return _controlled_steps(sol, tokens[:, :prompt_len], policy, schedule, budget, steps, given, None, seed, dispatcher)
