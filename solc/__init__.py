"""solc: compile a frozen HF causal LM into a model whose every token runs a chosen compute action.

    import solc
    model = solc.load_model("smollm2-135m")
    sol = solc.compile(model, actions=["attn", "mlp", "quant"])
    logits, hidden = sol(ids, actions)          # teacher-forced, one action per token
"""
import runtime.quiet  # noqa: F401  first: filters dependency import noise before anything imports torchao
from runtime.actions import Action, ActionSpace
from runtime.errors import ArgumentError, ArgumentTypeError, AssetError, SolcError, UnsupportedModelError
from runtime.sol_model import SOLModel, SOLOutput
from runtime.costs import CostTable, calibrate_cost_model, calibrate_costs
from runtime.schedulers import Fixed, Random, Schedule
from solc.artifacts import export, load, load_program
from solc.compile import compile
from solc.models import load_model, load_tokenizer
from solc import data

__all__ = [
    "Action",
    "ActionSpace",
    "ArgumentError",
    "ArgumentTypeError",
    "AssetError",
    "SolcError",
    "UnsupportedModelError",
    "SOLModel",
    "SOLOutput",
    "compile",
    "export",
    "load",
    "load_program",
    "calibrate_costs",
    "calibrate_cost_model",
    "CostTable",
    "Fixed",
    "Random",
    "Schedule",
    "load_model",
    "load_tokenizer",
    "data",
]
