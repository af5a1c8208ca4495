"""The kernel benchmarks: benchmarks/attention_cpu.py's --kv text times the kernel on the model's own cache
and next-step queries (keys as HF computes them), and its union column counts the pages the G heads of a
KV head share; attention_ab.py and int4_ab.py run two revisions of a kernel side by side."""
import pytest
import torch

import solc
from runtime import hugepages
from runtime.ops import cpu_mlp
from solc import data


@pytest.fixture(scope="module")
def attention_bench(load_benchmark):
    return load_benchmark("attention_cpu")


@pytest.mark.slow
def test_text_layers_hold_the_models_cache_and_queries(attention_bench):
    context = 43  # a partial last page
    layers = attention_bench.text_layers(context)
    ids = data.get_contexts(solc.load_tokenizer("smollm2-135m"), split="train", length=context, max_contexts=1)
    model = solc.load_model("smollm2-135m")
    with torch.no_grad():
        hf = model(ids, use_cache=True).past_key_values
    assert len(layers) == attention_bench.LAYERS
    for layer in (0, attention_bench.LAYERS - 1):
        q, k, v, p, _, _ = layers[layer]
        assert p == context - 1 and q.shape == (1, attention_bench.HQ, 1, attention_bench.D)
        torch.testing.assert_close(k[:, :, :context], hf.layers[layer].keys, atol=1e-4, rtol=0)
        torch.testing.assert_close(v[:, :, :context], hf.layers[layer].values, atol=1e-4, rtol=0)
        assert not k[:, :, context:].any()


def test_union_share_counts_pages_shared_by_the_heads_of_a_kv_head(attention_bench):
    G = attention_bench.HQ // attention_bench.HKV
    layers = attention_bench.random_layers(1000)
    same = []
    for q, k, v, p, low, high in layers:  # every head of a KV head asks the same query: the same pages
        q = q.clone()
        for h in range(attention_bench.HKV):
            q[0, h * G:(h + 1) * G] = q[0, h * G]
        same.append((q, k, v, p, low, high))
    assert attention_bench.union_share(same, 0.1) == pytest.approx(1 / G)
    share = attention_bench.union_share(layers, 0.1)  # random queries: few pages shared, all counted once
    assert 1 / G < share <= 1
    assert attention_bench.union_share(layers, 1.0) == 1.0


def test_attention_ab_builds_both_revisions_and_compares_their_outputs(load_benchmark, tmp_path):
    """benchmarks/attention_ab.py compiles cpu_attention.c of each git revision on its own and runs both on
    the same inputs: one revision against itself gives the same bits at every keep and thread count."""
    ab = load_benchmark("attention_ab")
    result = ab.main(["--base", "HEAD", "--head", "HEAD", "--context", "300", "--keeps", "1,0.6,0.1",
                      "--threads", "1,2", "--rounds", "1", "--out", str(tmp_path)])
    assert [(r["keep"], r["threads"]) for r in result["rows"]] == [(k, t) for k in (1.0, 0.6, 0.1) for t in (1, 2)]
    assert all(r["max_abs_diff"] == 0.0 and r["base_ms"] > 0 and r["head_ms"] > 0 for r in result["rows"])
    assert all(r["base_err_vs_reference"] < 2e-6 for r in result["rows"])  # the harness passes the right inputs
    saved = (tmp_path / "attention_ab_random_300.json").read_text()
    assert '"command": "python benchmarks/attention_ab.py --base HEAD --head HEAD' in saved


@pytest.mark.skipif(not cpu_mlp.int4_kernel(), reason="cpu_mlp.c's int4 linear needs AVX-512 BF16")
def test_int4_ab_builds_both_revisions_and_compares_their_outputs(load_benchmark, tmp_path):
    """benchmarks/int4_ab.py compiles cpu_linear.c + cpu_mlp.c of each revision on its own and runs both on
    SmolLM2's int4 copies: one revision against itself gives the same bits, on the reference's grid."""
    ab = load_benchmark("int4_ab")
    result = ab.main(["--base", "HEAD", "--head", "HEAD", "--layers", "2", "--rows", "1,3", "--threads", "1,2",
                      "--rounds", "1", "--flush-mib", "0.5", "--out", str(tmp_path), "--tag", "t"])
    assert [(r["threads"], r["rows"]) for r in result["rows"]] == [(t, r) for t in (1, 2) for r in (1, 3)]
    assert all(r["same_bits"] and r["base_ms"] > 0 and r["head_ms"] > 0 for r in result["rows"])
    assert all(r["head_ulps_vs_reference"] <= 1.0 for r in result["rows"])  # the harness passes the right inputs
    saved = (tmp_path / "int4_ab_t.json").read_text()
    assert '"command": "python benchmarks/int4_ab.py --base HEAD --head HEAD' in saved
    assert torch.is_grad_enabled()  # the process's grad mode is left as it was (later tests train)


def test_linear_ab_builds_both_revisions_and_compares_their_outputs(load_benchmark, tmp_path):
    """benchmarks/linear_ab.py compiles cpu_linear.c of each revision on its own: one revision against
    itself gives the same bits at every row count (full and partial 4-row tiles) and thread count."""
    ab = load_benchmark("linear_ab")
    result = ab.main(["--base", "HEAD", "--head", "HEAD", "--rows", "2,3,5", "--threads", "1,2", "--copies", "1",
                      "--rounds", "1", "--out", str(tmp_path), "--tag", "t"])
    assert [(r["threads"], r["rows"]) for r in result["rows"]] == [(t, r) for t in (1, 2) for r in (2, 3, 5)]
    assert all(r["same_bits"] and r["base_ms"] > 0 and r["head_ms"] > 0 for r in result["rows"])
    assert all(r["head_err_vs_torch"] < 1e-4 for r in result["rows"])  # the harness passes the right inputs
    assert '"command": "python benchmarks/linear_ab.py --base HEAD --head HEAD' in (tmp_path / "linear_ab_t.json").read_text()


@pytest.mark.parametrize("script,args,message", [
    ("attention_cpu", ["--keeps", "1,x"], "--keeps='1,x' is invalid: expected numbers in (0, 1]"),
    ("attention_cpu", ["--threads", "0"], "--threads='0' is invalid: expected integers >= 1"),
    ("attention_cpu", ["--kv", "text", "--contexts", "9000"], "--contexts='9000' is invalid: expected integers >= 16 and <= 8184"),
    ("attention_ab", ["--base", "HEAD", "--rounds", "0"], "--rounds=0 is invalid: expected an integer >= 1"),
    ("attention_ab", ["--base", "no-such-revision"], "--base='no-such-revision' is invalid: git show no-such-revision:"),
    ("int4_ab", ["--base", "HEAD", "--rows", "17"], "--rows='17' is invalid: expected integers in 1..16"),
    ("int4_ab", ["--base", "HEAD", "--layers", "31"], "--layers=31 is invalid: expected an integer in 1..30"),
    ("linear_ab", ["--base", "HEAD", "--rows", "1"], "--rows='1' is invalid: expected integers in 2..64"),
])
def test_bad_arguments_are_named_with_what_is_valid(load_benchmark, capsys, script, args, message):
    with pytest.raises(SystemExit):
        load_benchmark(script).main(args)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(hugepages._madvise() is None, reason="no transparent huge pages to ask for here")
def test_hugepages_ab_reads_the_same_caches_from_huge_pages(load_benchmark, tmp_path):
    """benchmarks/hugepages_ab.py times the attention kernel over caches on 4 KB pages and over copies on
    huge pages: the same bits at every keep and thread count."""
    ab = load_benchmark("hugepages_ab")
    result = ab.main(["--context", "12000", "--keeps", "1,0.1", "--threads", "1,2", "--rounds", "1",
                      "--out", str(tmp_path)])
    assert [(r["keep"], r["threads"]) for r in result["rows"]] == [(k, t) for k in (1.0, 0.1) for t in (1, 2)]
    assert all(r["max_abs_diff"] == 0.0 and r["base_ms"] > 0 and r["head_ms"] > 0 for r in result["rows"])
    saved = (tmp_path / "hugepages_ab_12000.json").read_text()
    assert '"command": "python benchmarks/hugepages_ab.py --context 12000' in saved
