"""Issue 12 acceptance 2 on few tokens: solc's bits-8 / bits-4 actions == torchao's int8 weight-only /
int4 quantize-dequantize of the MLP linears, within 0.5% perplexity (full figure: training/quant_check.py)."""
import pytest

import solc
from training.quant_check import check


@pytest.mark.slow
def test_weight_quant_actions_match_torchao_on_smollm2():
    model = solc.load_model("smollm2-135m")
    tokenizer = solc.load_tokenizer("smollm2-135m")
    contexts = solc.data.get_contexts(tokenizer, corpus="shakespeare", split="test", length=128, max_contexts=2)
    r = check(model, contexts)
    assert r["mlp_linears"] == 3 * 30 and r["int4_group_size"] == 64
    assert r["rel_diff_8"] <= 5e-3, r
    assert r["rel_diff_4"] <= 5e-3, r
    assert r["solc_bits4"] > r["solc_bits8"]  # the copies really ran: 4 bits costs quality
