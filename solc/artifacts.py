"""solc.export / solc.load: a deployable directory that needs neither training/ nor the network.

    artifacts/smollm2-sol/
      manifest.json        format version; versions of solc, torch, transformers; action grid; dtype;
                           max_seq_len; policy config; cost table; sha256 and size of every file
      model/               the base model (HF config + safetensors weights), rebuilt offline on load
      policy.safetensors   the policy network's weights (optional)
      tokenizer/           the tokenizer, when one was given (optional)
      programs/step.pt2    the rewritten decode graph as a torch.export program (portable, inspectable)

On load the base model is rebuilt from model/ and recompiled by the same passes (seconds), so the
runtime is the one that was tested. programs/step.pt2 is the same graph as a serialized
ExportedProgram (all actions, actions as an input) for tools that consume those; `load_program`
reads it back. Per-action AOTInductor packages are not written yet (see docs/runtime.md).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from passes.mlp_to_solc import copy_digests
from runtime import hf_adapter
from runtime.actions import ActionSpace
from runtime.costs import CostTable
from runtime.errors import AssetError
from runtime.kv_cache import CACHE_PARTS
from runtime.policy import PolicyConfig, PolicyNet
from solc.cache import sha256_file
from solc.compile import compile as compile_model

FORMAT, FORMAT_VERSION = "solc-artifact", 1
MANIFEST = "manifest.json"


def _versions() -> dict:
    return {name: metadata.version(name) for name in ("solc", "torch", "transformers")}


def _export_program(sol, path: Path) -> None:
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=1, max=sol.max_seq_len)
    cache = sol.new_cache(2, 24)  # 3 pages: no dimension of size 0 or 1 to specialise on
    ids = torch.zeros(2, 8, dtype=torch.long, device=cache.tensors[0].device)
    dims = {0: batch, 1: seq}
    kv_len = torch.export.Dim("kv_len", min=2, max=sol.max_seq_len)
    pages = torch.export.Dim("pages", min=2, max=sol.max_seq_len)
    parts = CACHE_PARTS * (len(cache.tensors) // len(CACHE_PARTS))
    cache_dims = [{0: batch, 2: kv_len if part in ("k_cache", "v_cache") else pages} for part in parts]
    program = torch.export.export(
        sol.graph, (ids, torch.arange(8).expand(2, 8).to(ids.device), torch.zeros_like(ids), *cache.tensors),
        dynamic_shapes=(dims, dims, dims, *cache_dims), strict=False,
    )
    torch.export.save(program, path)


def export(sol, policy: PolicyNet | None, path, tokenizer=None, programs: bool = True) -> Path:
    """Write `sol` (and `policy`, optionally `tokenizer`) to the directory `path`, atomically."""
    if sol.base_model is None:
        raise ValueError("export(sol=...) needs a SOLModel made by solc.compile or solc.load")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        hf_adapter.save_base_model(sol.base_model, tmp / "model")
        if policy is not None:
            if policy.config.space != sol.space.to_dict():
                raise ValueError("export(policy=...): the policy was built for another action space than sol")
            save_file({k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}, tmp / "policy.safetensors")
        if tokenizer is not None:
            hf_adapter.save_tokenizer(tokenizer, tmp / "tokenizer")
        if programs:
            (tmp / "programs").mkdir()
            _export_program(sol, tmp / "programs" / "step.pt2")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "versions": _versions(),
            "space": sol.space.to_dict(),
            "dtype": str(sol.dtype).removeprefix("torch."),
            "max_seq_len": sol.max_seq_len,
            "pipeline_uuid": sol.info["pipeline_uuid"],
            "model_config": hf_adapter.config_dict(sol.base_model),
            "policy": policy.config.to_dict() if policy is not None else None,
            "cost_table": sol.cost_table.to_dict() if sol.cost_table is not None else None,
            # The MLP weight copies (row-skipping W^T, int8/int4) are not stored: load recomputes them from
            # model/ with the same passes and checks their bytes against these digests.
            "mlp_copies": {"storage": "recompute", "bytes": sol.info["mlp_copies_bytes"],
                           "sha256": copy_digests(sol.graph)},
            "files": {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _read_manifest(path: Path, check_versions: bool) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise AssetError(f"{file}: missing; {path} is not a solc artifact (write one with solc.export)")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise AssetError(f"{file}: corrupt JSON ({e}); re-export the artifact") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise AssetError(
            f"{file}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this solc reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    if check_versions:
        here = _versions()
        for name, wrote in manifest["versions"].items():
            if wrote.split(".")[:2] != here[name].split(".")[:2]:
                raise AssetError(
                    f"{file}: written with {name} {wrote}, running {name} {here[name]}; re-export with this "
                    "version or pass check_versions=False"
                )
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise AssetError(f"{f}: missing from the artifact (listed in {MANIFEST})")
        if f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
            raise AssetError(f"{f}: corrupt (size or sha256 differs from {MANIFEST}); re-export the artifact")
    return manifest


def load(path, device=None, check_versions: bool = True):
    """Load an artifact written by `export`: returns (sol, policy or None, tokenizer or None)."""
    path = Path(path)
    manifest = _read_manifest(path, check_versions)
    dtype = getattr(torch, manifest["dtype"])
    model = hf_adapter.load_pretrained(str(path / "model"), dtype=dtype, device=device)
    space = ActionSpace.from_dict(manifest["space"])
    sol = compile_model(model, actions=list(space.axes), levels=space.levels, max_seq_len=manifest["max_seq_len"],
                        quant=space.quant)
    _check_copies(sol, manifest, path)
    if sol.info["pipeline_uuid"] != manifest["pipeline_uuid"]:
        sol.info["pipeline_changed_since_export"] = manifest["pipeline_uuid"]
    if manifest["cost_table"] is not None:
        sol.cost_table = CostTable.from_dict(manifest["cost_table"])
    policy = None
    if manifest["policy"] is not None:
        policy = PolicyNet(PolicyConfig.from_dict(manifest["policy"]))
        policy.load_state_dict(load_file(path / "policy.safetensors", device=str(device or "cpu")))
        policy.eval()
    tokenizer = hf_adapter.load_local_tokenizer(path / "tokenizer") if (path / "tokenizer").is_dir() else None
    return sol, policy, tokenizer


def _check_copies(sol, manifest: dict, path: Path) -> None:
    recorded = (manifest.get("mlp_copies") or {}).get("sha256")
    if recorded is None:
        return
    got = copy_digests(sol.graph)
    differ = sorted(name for name in set(recorded) | set(got) if recorded.get(name) != got.get(name))
    if differ:
        raise AssetError(
            f"{path / MANIFEST}: the MLP weight copies recomputed on load differ from the exported ones "
            f"({len(differ)} of {len(recorded)}, e.g. {differ[0]}); torch/torchao changed the quantization: "
            "re-export the artifact with this version"
        )


def load_program(path):
    """The artifact's rewritten decode graph as an ExportedProgram (registers the solc:: ops first)."""
    import runtime.ops.library  # noqa: F401  the program calls solc:: ops

    file = Path(path) / "programs" / "step.pt2"
    if not file.is_file():
        raise AssetError(f"{file}: missing (the artifact was exported with programs=False)")
    return torch.export.load(file)
