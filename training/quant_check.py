"""External check of the weight-quant actions against torchao's own quantization (issue 12, acceptance 2).

    python -m training.quant_check --max-contexts 4 --out docs/results/quant_check.json

On the same held-out tokens, teacher-forced perplexity of
  - solc's uniform bits-8 action vs the HF model with torchao's int8 weight-only quantization
    (`quantize_` + `Int8WeightOnlyConfig`) applied to the MLP linears;
  - solc's uniform bits-4 action vs the HF model whose MLP weights are replaced by torchao's int4
    quantize -> dequantize round trip (tinygemm convention, solc's group size).
Both must agree within 0.5% (the low-bit branch rounds activations to bf16; torchao's weight-only path
keeps fp32 activations, so the figures are close, not equal). Every position runs the action (no dense prefix).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

import solc
from runtime import hf_adapter, torchao_adapter, validation
from runtime.errors import ArgumentError
from solc.cache import check_replaceable_result
from training.cli import command_line, write_json


def mlp_linear_names(model: nn.Module, sol) -> list[str]:
    """Full names of every nn.Linear inside an MLP site solc rewrote."""
    return [f"{site.module}.{name}" for site in sol.info["mlp_sites"]
            for name, m in model.get_submodule(site.module).named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def hf_ppl(model: nn.Module, contexts: torch.Tensor, batch: int = 2) -> float:
    total, count = 0.0, 0
    for start in range(0, len(contexts), batch):
        ids = contexts[start:start + batch]
        logits = hf_adapter.causal_lm_forward(model, ids, torch.arange(ids.shape[1]).expand_as(ids))[0]
        nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="sum")
        total, count = total + nll.item(), count + ids[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def solc_ppl(sol, contexts: torch.Tensor, bits: int, batch: int = 2) -> float:
    from training.uniform_ppl import nll_under_action

    total, count = nll_under_action(sol, contexts, sol.space.index(solc.Action(bits=bits)), 0, batch)
    return math.exp(total / count)


def check(model: nn.Module, contexts: torch.Tensor) -> dict:
    sol = solc.compile(model, actions=["quant"], max_seq_len=contexts.shape[1], quant="weight")
    names = mlp_linear_names(model, sol)
    group = next(n.args[11] for n in sol.graph.graph.nodes if n.target is torch.ops.solc.mlp.default)
    int8_model = copy.deepcopy(model)
    torchao_adapter.int8_weight_only_(int8_model, names)
    int4_model = copy.deepcopy(model)
    for name in names:
        linear = int4_model.get_submodule(name)
        linear.weight.data = torchao_adapter.dequantize_int4_reference(linear.weight, group).to(linear.weight.dtype)
    out = {
        "dense_hf": hf_ppl(model, contexts),
        "solc_bits8": solc_ppl(sol, contexts, 8), "torchao_int8_weight_only": hf_ppl(int8_model, contexts),
        "solc_bits4": solc_ppl(sol, contexts, 4), "torchao_int4_dequantized": hf_ppl(int4_model, contexts),
        "int4_group_size": group, "mlp_linears": len(names), "tokens": int(contexts[:, 1:].numel()),
    }
    out["rel_diff_8"] = abs(out["solc_bits8"] / out["torchao_int8_weight_only"] - 1)
    out["rel_diff_4"] = abs(out["solc_bits4"] / out["torchao_int4_dequantized"] - 1)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.quant_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--split", default="test")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--max-contexts", type=int, default=4)
    parser.add_argument("--out", default="docs/results/quant_check.json",
                        help="the JSON written (a file that is not an earlier quant_check result is refused)")
    args = parser.parse_args(argv)
    try:  # before the model loads: a refusal costs nothing
        validation.check_int("--length", args.length, 2)
        validation.check_int("--max-contexts", args.max_contexts, 1)
        check_replaceable_result(Path(args.out), "python -m training.quant_check", "--out")
    except ArgumentError as e:
        parser.error(str(e))
    model = solc.load_model(args.model)
    tokenizer = solc.load_tokenizer(args.model)
    contexts = solc.data.get_contexts(tokenizer, corpus=args.corpus, split=args.split, length=args.length,
                                      max_contexts=args.max_contexts)
    result = check(model, contexts)
    result["command"] = command_line("training.quant_check", argv)
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
