"""solc.export / solc.load: a deployable directory that needs neither training/ nor the network.

    artifacts/smollm2-sol/
      manifest.json        format version; versions of solc, torch, transformers; action grid; dtype;
                           max_seq_len; policy config; cost table; sha256 and size of every file
      manifest.sha256      sha256 of manifest.json: a checksum against corruption, not a signature
      model/               the base model (HF config + safetensors weights), rebuilt offline on load
      buffers.safetensors  the base model's non-persistent buffers (rotary inv_freq), as exported
      policy.safetensors   the policy network's weights (optional)
      tokenizer/           the tokenizer, when one was given (optional)
      programs/step.pt2    the rewritten decode graph as a torch.export program, without its weights

Each weight is stored once, in model/. On load the base model is rebuilt from model/ and recompiled
by the same passes (seconds), so the runtime is the one that was tested. programs/step.pt2 is the same
graph as a serialized ExportedProgram (all actions, actions as an input) for tools that consume
those; its parameters, buffers and constants are stored as empty placeholders (listed with dtype and
shape in the manifest) and `load_program` fills them from the recompiled model, so derived tensors
(e.g. quantized weight copies a pass adds) are recomputed rather than stored a second time.

Writing never deletes what export did not write: an existing target must be empty or a solc
artifact holding only its own files (no links, no foreign or empty directories); the new artifact is
built in a sibling temporary directory and swapped in atomically, so a crash at any point leaves the
old artifact or the new one, complete.
"""
from __future__ import annotations

import json
import os
import shutil
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from passes.mlp_to_solc import copy_digests
from runtime import hf_adapter
from runtime.actions import ActionSpace
from runtime.budget import default_cost_spec
from runtime.cost_model import CostModelError, cost_model_from_dict
from runtime.costs import CostTable
from runtime.errors import ArgumentError, ArgumentTypeError, AssetError
from runtime.kv_cache import CACHE_PARTS
from runtime.policy import PolicyConfig, PolicyNet
from solc.cache import (
    make_directory, recover_directory, remove_stale_temporaries, replace_directory, sha256_bytes, sha256_file,
    temp_sibling,
)
from solc.compile import compile as compile_model
from solc.models import resolve_device

FORMAT, FORMAT_VERSION = "solc-artifact", 2
MANIFEST, MANIFEST_HASH = "manifest.json", "manifest.sha256"
PROGRAM = "programs/step.pt2"
BUFFERS = "buffers.safetensors"  # the base model's non-persistent buffers, which model/ does not hold
REQUIRED_KEYS = ("format", "format_version", "versions", "space", "dtype", "max_seq_len", "pipeline_uuid",
                 "model_config", "policy", "cost_table", "files", "program")


def _versions() -> dict:
    return {name: metadata.version(name) for name in ("solc", "torch", "transformers")}


# -- the exported program, stored without its tensors ----------------------------------------------
def _placeholder(t: torch.Tensor) -> torch.Tensor:
    empty = torch.empty(0, dtype=t.dtype)
    return torch.nn.Parameter(empty, requires_grad=False) if isinstance(t, torch.nn.Parameter) else empty


def _export_program(sol, path: Path) -> dict:
    """Write the decode graph as an ExportedProgram whose tensors are placeholders; returns
    {name: {"dtype", "shape"}} of the stripped tensors (load_program refills them by name)."""
    max_len = sol.max_seq_len
    kv = min(24, max_len)  # >= 2 pages, and no example dimension equal to another or to 0/1
    cache = sol.new_cache(5, kv)
    device = cache.tensors[0].device
    ids = torch.zeros(5, 7, dtype=torch.long, device=device)
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=1, max=max_len)
    dims = {0: batch, 1: seq}
    kv_len = torch.export.Dim("kv_len", min=2, max=max_len)
    pages = torch.export.Dim("pages", min=2, max=max_len)
    parts = CACHE_PARTS * (len(cache.tensors) // len(CACHE_PARTS))
    cache_dims = [{0: batch, 2: kv_len if part in ("k_cache", "v_cache") else pages} for part in parts]
    program = torch.export.export(
        sol.graph, (ids, torch.arange(7, device=device).expand(5, 7), torch.zeros_like(ids), *cache.tensors),
        dynamic_shapes=(dims, dims, dims, *cache_dims), strict=False,
    )
    tables = (program.state_dict, program.constants)
    stripped = {}
    for table in tables:
        for name, t in list(table.items()):
            if isinstance(t, torch.Tensor):
                stripped[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                table[name] = _placeholder(t)
    torch.export.save(program, path)
    return stripped


def _graph_tensor(graph: torch.nn.Module, name: str):
    obj = graph
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


# -- writing ---------------------------------------------------------------------------------------
def _owned_files(path: Path) -> set[str] | None:
    """The files a solc artifact at `path` may hold, from its manifest; None if it is not one."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return None
    return {MANIFEST, MANIFEST_HASH, *manifest["files"]}


def _scan(path: Path) -> tuple[set[str], list[str]]:
    """(regular files, entries export never writes) under `path`, without following links: a
    symbolic link (to a file or a directory), a non-regular file or an empty directory is the user's.
    (Path.is_dir follows links, so a link to the user's data would pass for one of export's folders.)"""
    files, special = set(), []
    with os.scandir(path) as entries:
        for entry in entries:
            rel = os.path.relpath(entry.path, path)
            if entry.is_symlink():
                special.append(f"{rel} (a symbolic link)")
            elif entry.is_dir(follow_symlinks=False):
                sub_files, sub_special = _scan(Path(entry.path))
                files |= {f"{rel}/{f}" for f in sub_files}
                special += [f"{rel}/{s}" for s in sub_special]
                if not sub_files and not sub_special:
                    special.append(f"{rel}/ (an empty directory)")
            elif entry.is_file(follow_symlinks=False):
                files.add(rel)
            else:
                special.append(f"{rel} (not a regular file)")
    return files, special


def _check_parent(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a directory (else mkdir fails with an OSError)."""
    for parent in path.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise ArgumentError("path", f"path={str(path)!r} is inside {str(parent)!r}, which is not a "
                                            "directory; choose a path under a directory")
            return


def _check_target(path: Path) -> None:
    """Refuse any target whose replacement would delete something export did not write."""
    if path == Path.cwd() or path in Path.cwd().parents:
        raise ArgumentError("path", f"path={str(path)!r} is the current directory or holds it; export into a new "
                                    "subdirectory (e.g. 'artifacts/my-model')")
    _check_parent(path)
    if path.is_symlink():
        # the swap would replace the link itself, not the directory it points to
        raise ArgumentError("path", f"path={str(path)!r} is a symbolic link (to {os.readlink(path)!r}); export "
                                    "replaces a directory, never a link: pass the directory it points to or a new path")
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise ArgumentError("path", f"path={str(path)!r} exists and is not a directory; export writes a directory, "
                                    "choose another path")
    files, special = _scan(path)
    if not files and not special:
        return
    owned = _owned_files(path)
    if owned is None:
        raise ArgumentError("path", f"path={str(path)!r} is a non-empty directory that is not a solc artifact; "
                                    "export never replaces it (its files would be lost): choose a new path")
    foreign = sorted(files - owned) + sorted(special)
    if foreign:
        raise ArgumentError("path", f"path={str(path)!r} is a solc artifact that also holds entries export did not "
                                    f"write ({', '.join(foreign[:5])}); move them out first, export never deletes them")


def export(sol, policy: PolicyNet | None, path, tokenizer=None, programs: bool = True) -> Path:
    """Write `sol` (and `policy`, optionally `tokenizer`) to the directory `path`, atomically.

    `path` must not exist, be empty, or hold a solc artifact (which is replaced); anything else is
    refused. Returns the path."""
    from runtime.sol_model import SOLModel

    if not isinstance(sol, SOLModel):
        raise ArgumentTypeError("sol", f"sol={type(sol).__name__} is invalid: a SOLModel made by solc.compile or solc.load")
    if sol.base_model is None:
        raise ArgumentError("sol", "export(sol=...) needs a SOLModel made by solc.compile or solc.load (it has no base model)")
    if policy is not None and not isinstance(policy, PolicyNet):
        raise ArgumentTypeError("policy", f"policy={type(policy).__name__} is invalid: None or a runtime.policy.PolicyNet")
    if policy is not None and policy.config.space != sol.space.to_dict():
        raise ArgumentError("policy", "export(policy=...): the policy was built for another action space than sol")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise ArgumentTypeError("tokenizer", f"tokenizer={type(tokenizer).__name__} is invalid: None or a HF tokenizer")
    if not isinstance(programs, bool):
        raise ArgumentTypeError("programs", f"programs={programs!r} is invalid: True or False")
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise ArgumentTypeError("path", f"path={path!r} is invalid: a directory path (str or pathlib.Path)")
    path = Path(os.path.abspath(path))
    recover_directory(path, lambda p: _owned_files(p) is not None)
    _check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArgumentError("path", f"path={str(path)!r}: its parent directory cannot be created ({e.strerror}); "
                                    "choose a path in a writable directory") from e
    remove_stale_temporaries(path)
    tmp = make_directory(temp_sibling(path))
    try:
        _write(sol, policy, tokenizer, programs, tmp)
        replace_directory(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write(sol, policy, tokenizer, programs: bool, out: Path) -> None:
    hf_adapter.save_base_model(sol.base_model, out / "model")
    # save_pretrained skips non-persistent buffers (rotary inv_freq) and load would recompute them in
    # fp32: a model cast with .to(bfloat16) would then give other logits. Store them as they are.
    buffers = {k: v.detach().cpu().clone().contiguous() for k, v in hf_adapter.non_persistent_buffers(sol.base_model).items()}
    if buffers:
        save_file(buffers, out / BUFFERS)
    if policy is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}, out / "policy.safetensors")
    if tokenizer is not None:
        hf_adapter.save_tokenizer(tokenizer, out / "tokenizer")
    program = None
    if programs:
        make_directory(out / "programs")
        program = {"file": PROGRAM, "tensors": _export_program(sol, out / PROGRAM)}
    files = sorted(p for p in out.rglob("*") if p.is_file())
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
        # what a cost budget is priced with: the calibrated table, else the analytic bytes model
        "cost_model": default_cost_spec(sol).cost_model,
        "program": program,
        "buffers": {"file": BUFFERS} if buffers else None,
        # The MLP weight copies (row-skipping W^T, int8/int4) are not stored: load recomputes them from
        # model/ with the same passes and checks their bytes against these digests.
        "mlp_copies": {"storage": "recompute", "bytes": sol.info["mlp_copies_bytes"], "sha256": copy_digests(sol.graph)},
        "files": {str(p.relative_to(out)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
    }
    write_manifest(out, manifest)


def write_manifest(out: Path, manifest: dict) -> None:
    """manifest.json and the sha256 of its exact bytes (load refuses a manifest that does not match: a
    check against corruption; anyone can recompute it, so it is no signature)."""
    text = json.dumps(manifest, indent=2).encode()
    (out / MANIFEST).write_bytes(text)
    (out / MANIFEST_HASH).write_text(sha256_bytes(text) + "\n")


# -- reading ---------------------------------------------------------------------------------------
def _read_manifest(path: Path, check_versions: bool) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise AssetError(f"{file}: missing; {path} is not a solc artifact (write one with solc.export)")
    raw = file.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AssetError(f"{file}: corrupt JSON ({e}); re-export the artifact") from e
    if not isinstance(manifest, dict):
        raise AssetError(f"{file}: not a JSON object; re-export the artifact")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise AssetError(
            f"{file}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this solc reads {FORMAT!r} version {FORMAT_VERSION} (re-export with this solc)"
        )
    hash_file = path / MANIFEST_HASH
    if not hash_file.is_file():
        raise AssetError(f"{hash_file}: missing; the manifest cannot be verified, re-export the artifact")
    if hash_file.read_text().strip() != sha256_bytes(raw):
        raise AssetError(f"{file}: its sha256 differs from {MANIFEST_HASH}: the manifest (action grid, configs, "
                         "file hashes) was edited after export; re-export the artifact instead of editing it")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise AssetError(f"{file}: lacks the keys {missing}; re-export the artifact")
    if not isinstance(manifest["files"], dict) or not isinstance(manifest["versions"], dict):
        raise AssetError(f"{file}: 'files' and 'versions' must be objects; re-export the artifact")
    if check_versions:
        here = _versions()
        for name, wrote in manifest["versions"].items():
            if name in here and str(wrote).split(".")[:2] != here[name].split(".")[:2]:
                raise AssetError(
                    f"{file}: written with {name} {wrote}, running {name} {here[name]}; re-export with this "
                    "version or pass check_versions=False"
                )
    for rel, meta in manifest["files"].items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:  # every file lies inside the artifact
            raise AssetError(f"{file}: lists {rel!r}, a path outside the artifact; re-export the artifact")
        f = path / rel
        if not f.is_file():
            raise AssetError(f"{f}: missing from the artifact (listed in {MANIFEST})")
        if not isinstance(meta, dict) or f.stat().st_size != meta.get("bytes") or sha256_file(f) != meta.get("sha256"):
            raise AssetError(f"{f}: corrupt (size or sha256 differs from {MANIFEST}); re-export the artifact")
    return manifest


def _field(manifest: dict, key: str, parse):
    try:
        return parse(manifest[key])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise AssetError(f"{MANIFEST}: field {key!r} is invalid ({e}); re-export the artifact") from e


def _measured_cost_model(d):
    """The manifest's calibrated cost model (None for the bytes model, recomputed from the weights)."""
    if d is None:
        return None
    try:
        model = cost_model_from_dict(d)
    except CostModelError as e:
        raise ValueError(str(e)) from None
    return model if d.get("kind") == "measured" else None


def _dtype(name) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name!r} is not a floating-point torch dtype")
    return dtype


def _positive_int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{value!r} is not a positive int")
    return value


def _checked_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise ArgumentTypeError("path", f"path={path!r} is invalid: the directory of a solc artifact (str or Path)")
    path = Path(path)
    recover_directory(path, lambda p: _owned_files(p) is not None)
    return path


def load(path, device=None, check_versions: bool = True):
    """Load an artifact written by `export`: returns (sol, policy or None, tokenizer or None)."""
    if not isinstance(check_versions, bool):
        raise ArgumentTypeError("check_versions", f"check_versions={check_versions!r} is invalid: True or False")
    device = resolve_device(device)
    if device is not None and device.type == "meta":  # would fail later, inside from_pretrained or compile
        raise ArgumentError("device", f"device={str(device)!r} is invalid: load needs the weights on a real device "
                                      "('cpu', 'cuda', 'cuda:N' or 'auto')")
    path = _checked_path(path)
    manifest = _read_manifest(path, check_versions)
    dtype = _field(manifest, "dtype", _dtype)
    space = _field(manifest, "space", ActionSpace.from_dict)
    policy_config = _field(manifest, "policy", lambda d: None if d is None else PolicyConfig.from_dict(d))
    cost_table = _field(manifest, "cost_table", lambda d: None if d is None else CostTable.from_dict(d))
    # absent in artifacts written before cost budgets; a bytes model is recomputed from the model itself
    cost_model = _field(manifest, "cost_model", _measured_cost_model) if "cost_model" in manifest else None
    max_seq_len = _field(manifest, "max_seq_len", _positive_int)
    _check_only_listed(path, manifest, "model")
    model = hf_adapter.load_pretrained(str(path / "model"), dtype=dtype, device=device)
    _restore_buffers(model, manifest, path)
    sol = compile_model(model, actions=list(space.axes), levels=space.levels, max_seq_len=max_seq_len,
                        quant=space.quant)
    _check_copies(sol, manifest, path)
    if sol.info["pipeline_uuid"] != manifest["pipeline_uuid"]:
        sol.info["pipeline_changed_since_export"] = manifest["pipeline_uuid"]
    sol.cost_table = cost_table
    sol.cost_model = cost_model
    policy = None
    if policy_config is not None:
        if "policy.safetensors" not in manifest["files"]:
            raise AssetError(f"{path / MANIFEST}: has a policy config but does not list policy.safetensors, so its "
                             "weights cannot be verified; re-export the artifact")
        policy = PolicyNet(policy_config)
        policy.load_state_dict(load_file(path / "policy.safetensors", device=str(device or "cpu")))
        policy.eval()
    tokenizer = None
    if _check_only_listed(path, manifest, "tokenizer"):
        tokenizer = hf_adapter.load_local_tokenizer(path / "tokenizer")
    return sol, policy, tokenizer


def _check_only_listed(path: Path, manifest: dict, folder: str) -> bool:
    """The HF loaders read whatever `folder` holds (a generation_config.json, a weight index, a
    tokenizer), so it must hold exactly the files the manifest lists and verified. Returns whether the
    manifest lists any (a tokenizer/ it does not list was added after export: refused, not loaded)."""
    listed = {rel for rel in manifest["files"] if rel.startswith(folder + "/")}
    root = path / folder
    if not os.path.lexists(root):
        return False  # a listed file would have been reported missing by _read_manifest
    if root.is_symlink() or not root.is_dir():
        raise AssetError(f"{root}: not a directory; re-export the artifact")
    files, special = _scan(root)
    unlisted = sorted(f"{folder}/{f}" for f in files if f"{folder}/{f}" not in listed) + [f"{folder}/{s}" for s in special]
    if not listed:
        raise AssetError(f"{root}: {MANIFEST} lists no file in it (the artifact was exported without it), so it was "
                         "added after export and cannot be verified; remove it, or re-export the artifact with it")
    if unlisted:
        raise AssetError(f"{root}: holds entries {MANIFEST} does not list ({', '.join(unlisted[:5])}), which load "
                         "would read unverified; remove them or re-export the artifact")
    return True


def _restore_buffers(model, manifest: dict, path: Path) -> None:
    """Give the rebuilt model the exported non-persistent buffers (dtype and value): from_pretrained
    recomputes them, in fp32, while the exported model may have held them cast."""
    entry = manifest.get("buffers")  # absent in artifacts written before it was stored
    if entry is None:
        return
    if entry != {"file": BUFFERS} or BUFFERS not in manifest["files"]:
        raise AssetError(f"{path / MANIFEST}: field 'buffers' is {entry!r}, expected {{'file': {BUFFERS!r}}} with "
                         f"{BUFFERS} listed in 'files'; re-export the artifact")
    try:
        hf_adapter.restore_buffers(model, load_file(path / BUFFERS))
    except (KeyError, ValueError) as e:
        raise AssetError(f"{path / BUFFERS}: buffer {e} does not fit the model in model/; re-export the artifact") from e


def _check_copies(sol, manifest: dict, path: Path) -> None:
    copies = manifest.get("mlp_copies")  # absent (or without digests) in artifacts written before the
    if copies is None or (isinstance(copies, dict) and "sha256" not in copies):  # copies were recomputed
        return
    recorded = copies.get("sha256") if isinstance(copies, dict) else None
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise AssetError(f"{path / MANIFEST}: field 'mlp_copies' is invalid ({copies!r:.80}): expected an object "
                         "with a 'sha256' object of digests; re-export the artifact")
    got = copy_digests(sol.graph)
    differ = sorted(name for name in set(recorded) | set(got) if recorded.get(name) != got.get(name))
    if differ:
        raise AssetError(
            f"{path / MANIFEST}: the MLP weight copies recomputed on load differ from the exported ones "
            f"({len(differ)} of {len(recorded)}, e.g. {differ[0]}); torch/torchao changed the quantization: "
            "re-export the artifact with this version"
        )


def load_program(path, sol=None):
    """The artifact's rewritten decode graph as an ExportedProgram, its tensors filled from the model
    (`sol`: the artifact already loaded with solc.load; loaded here if None)."""
    import runtime.ops.library  # noqa: F401  the program calls solc:: ops

    path = _checked_path(path)
    manifest = _read_manifest(path, check_versions=False)
    program = manifest["program"]
    if program is None:
        raise AssetError(f"{path / PROGRAM}: missing (the artifact was exported with programs=False)")
    if PROGRAM not in manifest["files"]:
        raise AssetError(f"{path / MANIFEST}: does not list {PROGRAM}, so it cannot be verified; re-export the artifact")
    if sol is None:
        sol = load(path)[0]
    ep = torch.export.load(path / PROGRAM)
    tensors = _field(manifest, "program", lambda p: dict(p["tensors"]))
    for table in (ep.state_dict, ep.constants):
        for name in list(table):
            if name not in tensors:
                continue
            t = _graph_tensor(sol.graph, name)
            want = tensors[name]
            if t is None or list(t.shape) != want["shape"] or str(t.dtype).removeprefix("torch.") != want["dtype"]:
                raise AssetError(f"{path / PROGRAM}: tensor {name!r} ({want}) is not in the recompiled model; the "
                                 "pass pipeline changed since export, re-export the artifact")
            table[name] = torch.nn.Parameter(t, requires_grad=False) if isinstance(table[name], torch.nn.Parameter) else t
    return ep
