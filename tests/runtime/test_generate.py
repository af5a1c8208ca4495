"""generate/score through the runtime: DESIGN invariants 3 (decoding == teacher forcing) and 4
(the budget reported is the budget of the actions that ran)."""
import pytest
import torch

import solc
from runtime.dispatch import StepDispatcher, specialize
from runtime.generate import budget_targets, score
from runtime.schedulers import DENSE_PREFIX, Random

TOL = 1e-4


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen3", "tiny-gpt-neox"])
def sol(request):
    return solc.compile(solc.load_model(request.param), max_seq_len=64)


def _tokens(sol, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, sol.token_embedding.shape[0], (batch, length), generator=g)


def _teacher_forced_logprobs(sol, tokens, prompt_len, step_actions):
    actions = torch.full_like(tokens, sol.space.dense_index)
    actions[:, prompt_len - 1 : prompt_len - 1 + step_actions.shape[1]] = step_actions
    with torch.no_grad():
        logp = torch.log_softmax(sol(tokens[:, :-1], actions[:, :-1]).logits.float(), -1)
    return logp[:, prompt_len - 1 :].gather(-1, tokens[:, prompt_len:, None]).squeeze(-1)


def test_runtime_decoding_equals_teacher_forcing_mixed_actions(sol):
    """Given tokens and a per-row schedule, runtime log-probs == the teacher-forced forward."""
    tokens = _tokens(sol, 3, 30)
    g = torch.Generator().manual_seed(1)
    schedule = torch.randint(0, len(sol.space), (3, 20), generator=g)
    out = score(sol, tokens, prompt_len=10, schedule=schedule)
    assert torch.equal(out.actions, schedule)  # every step past DENSE_PREFIX ran what was asked
    expected = _teacher_forced_logprobs(sol, tokens, 10, out.actions)
    torch.testing.assert_close(out.logprobs, expected, atol=TOL, rtol=0)


def test_generate_greedy_tokens_are_the_argmax_of_their_step(sol):
    prompt = _tokens(sol, 2, 9)
    out = sol.generate(prompt, budget=0.55, max_new_tokens=12, eos_token_id=[])
    expected = _teacher_forced_logprobs(sol, out.tokens, 9, out.actions)
    torch.testing.assert_close(out.logprobs, expected, atol=TOL, rtol=0)
    # greedy: each generated token is the most likely one under its action
    actions = torch.full_like(out.tokens, sol.space.dense_index)
    actions[:, 8:20] = out.actions
    with torch.no_grad():
        argmax = sol(out.tokens[:, :-1], actions[:, :-1]).logits[:, 8:].argmax(-1)
    assert torch.equal(argmax, out.tokens[:, 9:])


def test_reported_budget_is_the_budget_of_the_actions_that_ran(sol):
    prompt = _tokens(sol, 2, 3)  # short prompt: the first steps fall inside DENSE_PREFIX
    out = sol.generate(prompt, policy=Random(), budget={"attn": 0.4, "mlp": 0.7, "quant": 0.6}, max_new_tokens=24, eos_token_id=[])
    positions = torch.arange(2, 2 + 24)
    assert torch.equal(out.controlled[0], positions >= DENSE_PREFIX)
    assert (out.actions[:, ~out.controlled[0]] == sol.space.dense_index).all()
    costs = sol.space.cost_table()[out.actions[out.controlled]]
    for i, axis in enumerate(("attn", "mlp", "quant")):
        assert out.budget[axis] == pytest.approx(costs[:, i].mean().item(), abs=1e-12)
    assert out.budget["attn"] == pytest.approx(0.4, abs=0.02)
    assert out.budget["net_keep"] == pytest.approx((out.budget["attn"] + out.budget["mlp"] + out.budget["quant"]) / 3)


def test_sampling_is_reproducible_and_respects_top_k(sol):
    prompt = _tokens(sol, 2, 8)
    a = sol.generate(prompt, max_new_tokens=10, temperature=1.0, top_k=3, seed=7, eos_token_id=[])
    b = sol.generate(prompt, max_new_tokens=10, temperature=1.0, top_k=3, seed=7, eos_token_id=[])
    assert torch.equal(a.tokens, b.tokens)
    with torch.no_grad():
        logits = sol(a.tokens[:, :-1]).logits[:, 7:]
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == a.tokens[:, 8:, None]).any(-1).all()


def test_a_sampler_that_keeps_its_buffers_draws_what_the_one_shot_form_draws():
    """generate's _Sampler reuses its [B, V] temporaries from step to step: the same draws, bit for bit,
    as fresh temporaries, over steps whose logits differ (top-k and top-p masks written into the buffer)."""
    from runtime.generate import _Sampler, _sample

    g = torch.Generator().manual_seed(0)
    held = _Sampler(0.7, 40, 0.9, torch.Generator().manual_seed(5))
    fresh = torch.Generator().manual_seed(5)
    for step in range(6):
        logits = torch.randn(3, 500, generator=g) * 3
        assert torch.equal(held(logits), _sample(logits, 0.7, 40, 0.9, fresh))
    assert held._buffers[0].shape == (3, 500)


def test_per_row_seeds_make_a_rows_samples_independent_of_its_batch_mates(sol):
    """seed=[one int per row]: a row's sampled tokens, its sampled policy's actions and their log-probs
    are those of its prompt alone with its own seed, whatever shares the batch (ragged prompts too)."""
    from runtime.policy import PolicyConfig, PolicyNet, PolicySource

    torch.manual_seed(0)
    policy = PolicyNet(PolicyConfig.for_model(sol, d_model=32, n_heads=2)).eval()
    with torch.no_grad():
        policy.action_head.bias.normal_(0, 1.0)  # a spread of actions to sample from
    prompts = [_tokens(sol, 1, n, seed=n)[0].tolist() for n in (5, 9, 9, 12)]
    seeds = [3, 1, 4, 1]  # rows 1 and 3 share a seed, not a prompt
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95, eos_token_id=[], budget=0.6)
    batch = sol.generate(prompts, policy=PolicySource(policy, temperature=1.5), seed=seeds, **kw)
    for r, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = sol.generate([prompt], policy=PolicySource(policy, temperature=1.5), seed=seed, **kw)
        assert torch.equal(alone.tokens[0, -8:], batch.tokens[r, -8:])
        assert torch.equal(alone.actions[0], batch.actions[r])
        assert torch.equal(alone.logprobs[0], batch.logprobs[r])
    assert len(set(batch.actions[:, DENSE_PREFIX:].flatten().tolist())) > 2  # the policy did sample
    assert not torch.equal(batch.tokens[1, -8:], batch.tokens[2, -8:])  # one prompt, two seeds
    with pytest.raises(ValueError, match=r"seed=\[1, 2\] is invalid: an int, or a list of 4 ints"):
        sol.generate(prompts, seed=[1, 2], **kw)
    with pytest.raises(ValueError, match="seed=-1 is invalid"):
        sol.generate(prompts, seed=[1, -1, 2, 3], **kw)
    with pytest.raises(TypeError, match="seed=0.5"):
        sol.generate(prompts, seed=[1, 0.5, 2, 3], **kw)


def test_per_row_seeds_shuffle_each_rows_random_schedule_on_its_own(sol):
    tokens = _tokens(sol, 3, 24)
    seeds = [5, 6, 7]
    batch = score(sol, tokens, 8, policy=Random(), budget=0.6, budget_mode="per-axis", seed=seeds)
    for r in range(3):
        alone = score(sol, tokens[r:r + 1], 8, policy=Random(), budget=0.6, budget_mode="per-axis", seed=seeds[r])
        assert torch.equal(alone.actions[0], batch.actions[r])
        assert torch.equal(alone.logprobs[0], batch.logprobs[r])
    assert not torch.equal(batch.actions[0], batch.actions[1])


def test_eos_stops_a_row_and_leaves_its_budget_alone(sol):
    prompt = _tokens(sol, 2, 8)
    first = sol.generate(prompt, max_new_tokens=6)
    eos = int(first.tokens[0, 10])  # row 0 emits this at step 2
    out = sol.generate(prompt, max_new_tokens=6, eos_token_id=eos)
    row0 = out.tokens[0, 8:].tolist()
    stop = row0.index(eos)
    assert all(t == eos for t in row0[stop:])
    assert (out.actions[0, stop + 1 :] == -1).all() and not out.controlled[0, stop + 1 :].any()


def test_a_finished_row_shows_the_pad_token_and_multiple_eos_ids_stop_it(sol):
    """After its EOS a row shows pad_token_id (HF's fill; default the first EOS id), whichever EOS id stopped it."""
    prompt = _tokens(sol, 2, 8)
    first = sol.generate(prompt, max_new_tokens=6, eos_token_id=[])
    eos = int(first.tokens[0, 9])  # row 0 emits this at step 1
    other = (eos + 1) % sol.token_embedding.shape[0]
    for pad, fill in ((None, other), (3, 3)):
        out = sol.generate(prompt, max_new_tokens=6, eos_token_id=[other, eos], pad_token_id=pad)
        row0 = out.tokens[0, 8:].tolist()
        stop = row0.index(eos)
        assert stop <= 1 and all(t == fill for t in row0[stop + 1:])
        assert torch.equal(out.tokens[0, 8:8 + stop + 1], first.tokens[0, 8:8 + stop + 1])


class _AngleTokenizer:
    """Decodes id i as "<i>": a stop string like "3><5" spans two tokens."""

    @staticmethod
    def decode(ids):
        return "".join(f"<{i}>" for i in ids)


def test_stop_strings_stop_a_row_once_its_generated_text_holds_one(sol):
    """As HF's generate(stop_strings=..., tokenizer=...): the row stops at the token that completes the
    string (kept), even when the string spans tokens; its later steps do not run and count in no budget;
    the other row runs on as before; the prompt's text is not searched."""
    prompt = _tokens(sol, 2, 8)
    first = sol.generate(prompt, max_new_tokens=8, eos_token_id=[])
    row0, row1 = first.tokens[0, 8:].tolist(), first.tokens[1, 8:].tolist()
    stop = f"{row0[1]}><{row0[2]}"  # the end of token 1 and the start of token 2
    if stop in _AngleTokenizer.decode(row1) or stop in _AngleTokenizer.decode(row0[:2]):
        pytest.skip("the random tokens repeat the stop string elsewhere")
    out = sol.generate(prompt, max_new_tokens=8, eos_token_id=[], stop_strings=[stop, "never"],
                       tokenizer=_AngleTokenizer(), pad_token_id=5)
    assert out.tokens[0, 8:].tolist() == row0[:3] + [5] * 5
    assert (out.actions[0, 3:] == -1).all() and not out.controlled[0, 3:].any() and out.controlled[0, :3].all()
    assert torch.equal(out.tokens[1], first.tokens[1]) and torch.equal(out.logprobs[1], first.logprobs[1])
    in_prompt = _AngleTokenizer.decode(prompt[0, :2].tolist())
    if in_prompt not in _AngleTokenizer.decode(row0):
        assert torch.equal(sol.generate(prompt, max_new_tokens=8, eos_token_id=[], stop_strings=in_prompt,
                                        tokenizer=_AngleTokenizer()).tokens, first.tokens)
    with pytest.raises(solc.ArgumentError, match="stop_strings need the tokenizer") as e:
        sol.generate(prompt, max_new_tokens=2, stop_strings=["x"])
    assert e.value.argument == "tokenizer"
    for bad in ([""], [], [3], ""):
        with pytest.raises(solc.ArgumentError, match="stop_strings=.* is invalid"):
            sol.generate(prompt, max_new_tokens=2, stop_strings=bad, tokenizer=_AngleTokenizer())


def test_a_tiny_temperature_samples_the_greedy_tokens(sol):
    """logits / 1e-39 overflowed float32: every token came out NaN, then the last vocabulary id."""
    prompt = _tokens(sol, 2, 8)
    greedy = sol.generate(prompt, max_new_tokens=6, eos_token_id=[]).tokens
    for t in (1e-39, 1e-45, 5e-324):
        assert torch.equal(sol.generate(prompt, max_new_tokens=6, eos_token_id=[], temperature=t, seed=1).tokens, greedy)


def test_score_of_a_ragged_generate_equals_its_log_probs(sol):
    """score(out.tokens, P, attention_mask=out.attention_mask) rescores left-padded rows as their own
    prompts; without the mask the padding would be read as prompt tokens."""
    prompts = [_tokens(sol, 1, 9, seed=2)[0].tolist(), _tokens(sol, 1, 4, seed=3)[0].tolist()]
    out = sol.generate(prompts, max_new_tokens=5, eos_token_id=[], budget=0.6)
    again = sol.score(out.tokens, 9, attention_mask=out.attention_mask, budget=0.6)
    torch.testing.assert_close(again.logprobs, out.logprobs, atol=1e-6, rtol=0)
    assert torch.equal(again.actions, out.actions)
    alone = sol.score(out.tokens[1:, 5:], 4, budget=0.6)  # the short row without its padding
    torch.testing.assert_close(again.logprobs[1:], alone.logprobs, atol=1e-6, rtol=0)
    mask = out.attention_mask.clone()
    mask[0, -1] = 0
    with pytest.raises(solc.ArgumentError, match="attention_mask must be 1 on every scored token") as e:
        sol.score(out.tokens, 9, attention_mask=mask)
    assert e.value.argument == "attention_mask"
    with pytest.raises(solc.ArgumentError, match="attention_mask has shape"):
        sol.score(out.tokens, 9, attention_mask=mask[:, 1:])


def test_budget_errors_are_argument_errors(sol):
    prompt = _tokens(sol, 3, 8)
    for bad, mode in ((1.5, None), (0.01, None), ("0.6", None), ({"attn": 0.5}, "cost"), (1.5, "per-axis")):
        with pytest.raises(solc.ArgumentError) as e:
            sol.generate(prompt[:1], budget=bad, budget_mode=mode, max_new_tokens=2)
        assert e.value.argument == "budget"
    with pytest.raises(solc.ArgumentError, match="ambiguous at batch 3") as e:
        sol.generate(prompt, budget=[0.5, 0.7, 0.9], max_new_tokens=2)
    per_row = sol.generate(prompt, budget=[0.5, 0.7, 0.9], budget_mode="cost", max_new_tokens=2)
    per_axis = sol.generate(prompt, budget=[0.5, 0.7, 0.9], budget_mode="per-axis", max_new_tokens=2)
    assert per_row.budget["budget_mode"] == "cost" and per_axis.budget["budget_mode"] == "per-axis"
    assert sol.generate(prompt[:2], budget=[0.5, 0.7, 0.9], max_new_tokens=2).budget["budget_mode"] == "per-axis"
    with pytest.raises(solc.ArgumentError) as e:
        sol.generate(prompt[:1], attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]]), max_new_tokens=2)
    assert e.value.argument == "attention_mask"


def test_seeds_and_eos_ids_as_tensors_or_numpy_arrays(sol):
    np = pytest.importorskip("numpy")
    prompt = _tokens(sol, 2, 8)
    kw = dict(max_new_tokens=4, temperature=1.0, eos_token_id=[])
    per_row = sol.generate(prompt, seed=[3, 4], **kw).tokens
    for seed in (np.array([3, 4]), torch.tensor([3, 4]), (3, 4)):
        assert torch.equal(sol.generate(prompt, seed=seed, **kw).tokens, per_row)
    one = sol.generate(prompt, seed=5, **kw).tokens
    for seed in (np.int64(5), torch.tensor(5), np.array(5)):
        assert torch.equal(sol.generate(prompt, seed=seed, **kw).tokens, one)
    for bad in (np.array([[1, 2]]), np.array([1.5, 2.0]), torch.tensor([1, 2, 3])):
        with pytest.raises(solc.ArgumentError, match="seed"):
            sol.generate(prompt, seed=bad, **kw)
    first = sol.generate(prompt, max_new_tokens=4, eos_token_id=[])
    eos = int(first.tokens[0, 9])
    want = sol.generate(prompt, max_new_tokens=4, eos_token_id=[eos]).tokens
    for ids in (torch.tensor([eos]), torch.tensor(eos), np.array([eos])):
        assert torch.equal(sol.generate(prompt, max_new_tokens=4, eos_token_id=ids).tokens, want)


def test_bad_arguments_name_the_argument(sol):
    prompt = _tokens(sol, 1, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sol.generate(prompt, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        sol.generate(prompt, temperature=-1)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        sol.generate(prompt, max_new_tokens=80)
    with pytest.raises(ValueError, match="budget"):
        budget_targets(1.5, 1)
    with pytest.raises(ValueError, match="unknown axes"):
        budget_targets({"speed": 0.5}, 1)


def test_dispatcher_variants_are_keyed_by_action_and_batch(sol):
    """Uniform steps run the specialised variant of their action; mixed steps the generic graph;
    all give the same numbers as the generic graph."""
    tokens = _tokens(sol, 2, 16)
    dispatcher = StepDispatcher(sol, mode="eager")
    schedule = torch.tensor([[3, 3, 5, 26, 0, 0], [3, 4, 5, 26, 0, 1]])
    out = score(sol, tokens[:, :16], prompt_len=10, schedule=schedule, dispatcher=dispatcher)
    assert dispatcher.keys == [(0, 2), (3, 2), (5, 2), (26, 2)]
    reference = score(sol, tokens[:, :16], prompt_len=10, schedule=schedule)
    torch.testing.assert_close(out.logprobs, reference.logprobs, atol=1e-6, rtol=0)


def test_specialized_graph_has_no_actions_input(sol):
    gm = specialize(sol.graph, 4)
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert "actions" not in names and names[:2] == ["input_ids", "position_ids"]
    tokens = _tokens(sol, 2, 12)
    cache_a, cache_b = sol.new_cache(2, 12), sol.new_cache(2, 12)
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        got = gm(tokens, pos, *cache_a.tensors)[0]
        expected = sol(tokens, torch.full_like(tokens, 4), pos, cache_b).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_compiled_variants_match_eager():
    sol = solc.compile(solc.load_model("tiny-llama"), max_seq_len=32)
    tokens = _tokens(sol, 2, 14)
    schedule = torch.tensor([[2, 2, 9, 9], [2, 2, 9, 9]])
    eager = score(sol, tokens[:, :14], prompt_len=10, schedule=schedule)
    compiled = StepDispatcher(sol, mode="compile")
    fast = score(sol, tokens[:, :14], prompt_len=10, schedule=schedule, dispatcher=compiled)
    assert compiled.keys == [(2, 2), (9, 2)]
    torch.testing.assert_close(fast.logprobs, eager.logprobs, atol=1e-5, rtol=0)
