"""Checkpoints in the Hugging Face / vLLM layout: the name table, streaming load, atomic sharded save.

Our state-dict names equal the hub names except for two structural rules, written once here:
  model.mtp_layers.{k}.*            <-> model.layers.{num_hidden_layers + k}.*
  ...mlp.experts.gate_up_proj [E,2F,D] <-> ...mlp.experts.{e}.gate_proj.weight (rows :F), up_proj.weight (rows F:)
  ...mlp.experts.down_proj    [E,D,F]  <-> ...mlp.experts.{e}.down_proj.weight
MTP layers also carry copies of the shared embedding and head (`embed_tokens`, `shared_head.head`), which
vLLM's MTP module loads; we write them and ignore them on load.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dspost.kernels import mxfp4_dequant, mxfp4_quant, weight_dequant, weight_quant
from dspost.model.deepseek_v3 import DeepseekV3, ModelArgs

# stacked expert parameter -> [(per-expert HF leaf, half of the rows or None for all)]
EXPERT_TABLE: dict[str, list[tuple[str, int | None]]] = {
    "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
    "down_proj": [("down_proj", None)],
}
MTP_SHARED = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
# Heads of a sequence-classification checkpoint (`reward_model.py` loads them); the causal LM skips them.
SEQUENCE_HEADS = frozenset({"score.weight"})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED_RE = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    pass


# ----------------------------------------------------------------------------------------- names
def _to_hf_prefix(name: str, args: ModelArgs) -> str:
    m = re.match(r"^model\.mtp_layers\.(\d+)\.(.*)$", name)
    return f"model.layers.{args.num_hidden_layers + int(m[1])}.{m[2]}" if m else name


def _from_hf_prefix(name: str, args: ModelArgs) -> str | None:
    m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
    if m and int(m[1]) >= args.num_hidden_layers:
        k = int(m[1]) - args.num_hidden_layers
        if k >= args.num_nextn_predict_layers:
            return None  # MTP layers this config does not use (HF ignores them likewise)
        return f"model.mtp_layers.{k}.{m[2]}"
    return name


def hf_tensors(model: DeepseekV3, include_mtp: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(hub name, tensor) for every tensor of the checkpoint; views, no copies (also used by weight sync,
    which leaves out the MTP layers: the rollout engine serves the main stack)."""
    args = model.args
    state = model.state_dict()
    for name, t in state.items():
        if not include_mtp and name.startswith("model.mtp_layers."):
            continue
        m = _STACKED_RE.match(name)
        if m:
            prefix = _to_hf_prefix(m[1], args)
            for e in range(t.shape[0]):
                for leaf, half in EXPERT_TABLE[m[2]]:
                    part = t[e] if half is None else t[e].chunk(2, dim=0)[half]
                    yield f"{prefix}.{e}.{leaf}.weight", part
            continue
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue
        yield _to_hf_prefix(name, args), t
    for k in range(args.num_nextn_predict_layers if include_mtp else 0):
        for leaf, shared in MTP_SHARED.items():
            yield f"model.layers.{args.num_hidden_layers + k}.{leaf}", state[shared]


# ------------------------------------------------------------------------------------------ save
# Temporaries of `atomic_dir` and `write_file_atomic`: `.NAME.tmp-PID-TOKEN` (being written) and
# `.NAME.old-PID-TOKEN` (the directory it replaces, moved aside between the two renames). The older
# `.NAME.tmp-PID` form (no token, no lock) is matched too, so what earlier versions left is cleaned as well.
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<token>\d+(?:-[0-9a-f]+)?)$")


def _temp_token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _flock(fd: int) -> bool:
    """Take an exclusive lock on `fd` without waiting; False where it is held elsewhere or the filesystem has no
    locks. flock locks belong to the open file and die with the process, whoever the host or pid namespace."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory bottom-up, `root` last: a rename that publishes `root`
    then cannot reach the disk before its contents (ext4 and XFS may otherwise persist the rename with empty files)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            file = os.path.join(dirpath, name)
            if os.path.islink(file):
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _publish(tmp: Path, path: Path, old: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` is moved aside to `old` for the moment between the two renames
    (a directory cannot be replaced by one rename) and put back if the second fails."""
    aside = os.path.lexists(path)
    if aside:
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if aside:
            os.rename(old, path)
        raise
    _fsync_dir(path.parent)
    if aside:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Write a directory under a temporary name and rename it into place, so a crash never leaves half.

    Everything written is fsynced before the rename and the parent after it, so a crash after the rename
    cannot publish an empty or partial directory. The writer holds an flock on its temporary until it is
    published, which is how `clean_stale_temporaries` (called here first for `path`) tells a killed writer's
    leftovers from a live one's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent, path.name)
    token = _temp_token()
    tmp, old = path.parent / f".{path.name}.tmp-{token}", path.parent / f".{path.name}.old-{token}"
    tmp.mkdir()
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    _flock(fd)  # a fresh directory: only a filesystem without locks refuses (then nothing is ever cleaned up)
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish(tmp, path, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def write_file_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a file under a temporary name (locked like `atomic_dir`'s), fsync it, rename it into place and
    fsync the directory: readers see the old or the new content, after a crash too."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{_temp_token()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        _flock(fd)
        view = memoryview(data.encode() if isinstance(data, str) else data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def clean_stale_temporaries(parent: str | os.PathLike, target: str | None = None) -> list[str]:
    """Remove the temporaries that killed writers of `atomic_dir` / `write_file_atomic` left in `parent` (those
    of `target` only, or all); returns their names.

    Safe with live writers of this or any other process, on this host or another sharing the filesystem: a
    temporary is touched only once its writer's flock could be taken, and flock locks are released when their
    process dies (a pid could be reused or live in another namespace; a lock cannot). On a filesystem without
    locks nothing is removed. A writer killed between the two renames of a replacement left the replaced
    directory aside and none in place: it is put back, so the state is the one before that save."""
    parent = Path(parent)
    groups: dict[tuple[str, str], Path | None] = {}
    for p in parent.iterdir():
        m = _TEMP_RE.match(p.name)
        if m and (target is None or m["target"] == target):
            old = groups.get((m["target"], m["token"]))
            groups[(m["target"], m["token"])] = p if m["kind"] == "old" else old
    removed: list[str] = []
    for (name, token), old in sorted(groups.items()):
        tmp = parent / f".{name}.tmp-{token}"
        fd = _lock_if_free(tmp)
        if fd is None and os.path.lexists(tmp):
            continue  # its writer is alive (or this filesystem cannot tell)
        try:
            if old is not None and not os.path.lexists(parent / name):
                os.rename(old, parent / name)
                _fsync_dir(parent)
                old = None
            for p in (tmp, old):
                if p is not None and os.path.lexists(p):
                    _remove(p)
                    removed.append(p.name)
        except OSError:
            continue  # another cleaner got there first
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def _lock_if_free(path: Path) -> int | None:
    """An open, locked descriptor of `path` if no one else holds its lock and the name still names it; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if _flock(fd) and os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            return fd
    except OSError:  # renamed or removed meanwhile: its writer published it
        pass
    os.close(fd)
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_pretrained(model: DeepseekV3, path: str | os.PathLike, tokenizer=None,
                    max_shard_bytes: int = 4 << 30, dtype: torch.dtype | None = None,
                    quantization: str | None = None) -> Path:
    with atomic_dir(path) as tmp:
        write_checkpoint(model, tmp, tokenizer, max_shard_bytes, dtype, quantization)
    return Path(path)


# ------------------------------------------------------------------------------- quantised weights
WEIGHT_FORMATS = ("fp8", "fp8+fp4-experts")
# Kept in high precision in DeepSeek's FP8 checkpoints: embedding, head, router, norms, MTP glue.
_NOT_FP8 = ("embed_tokens", "lm_head", "mlp.gate.", "norm", "eh_proj", "shared_head")


def quantize_named(named: Iterator[tuple[str, torch.Tensor]], fmt: str,
                   block_size: int = 128) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors in a quantised weight format: `fp8` is DeepSeek-V3's (every projection and expert
    weight float8_e4m3fn with an fp32 `weight_scale_inv` per 128x128 block); `fp8+fp4-experts` adds
    DeepSeek-V4's MXFP4 routed experts (E2M1 pairs packed in int8 [out, in/2], low nibble first, and an
    e8m0 `weight_scale_inv` per 1x32 block). Used for checkpoints and for quantise-on-sync alike."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {fmt!r}: expected one of {WEIGHT_FORMATS}")
    for name, t in named:
        if fmt == "fp8+fp4-experts" and _EXPERT_RE.match(name):
            packed, scales = mxfp4_quant(t.detach().float().contiguous())
            yield name, packed.view(torch.int8)  # int8 as in DeepSeek-V4's checkpoints
            yield name + "_scale_inv", scales.view(torch.float8_e8m0fnu)
        elif (name.endswith(".weight") and t.dim() == 2 and not any(k in name for k in _NOT_FP8)
              and t.shape[0] % block_size == 0 and t.shape[1] % block_size == 0):
            # Ragged weights (e.g. V3's 576-row kv_a_proj_with_mqa) stay unquantised: our loader reads ragged
            # blocks, but transformers' FP8 dequantiser derives the block from the scale grid and refuses them.
            q, scale_inv = weight_quant(t.detach().float().contiguous(), block_size)
            yield name, q
            yield name + "_scale_inv", scale_inv
        else:
            yield name, t


FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": [128, 128]}


def write_checkpoint(model: DeepseekV3, out: Path, tokenizer=None, max_shard_bytes: int = 4 << 30,
                     dtype: torch.dtype | None = None, quantization: str | None = None) -> None:
    """Write into an existing directory (callers wrap it in `atomic_dir`); `quantization` is a weight format
    of `quantize_named`."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    seen: set[int] = set()
    named = hf_tensors(model)
    if quantization:
        named = quantize_named(named, quantization)
    for name, t in named:
        if t.data_ptr() in seen and t.numel():  # the MTP copies of the shared embedding/head
            t = t.clone()
        seen.add(t.data_ptr())
        # The correction bias stays fp32 whatever the model dtype (vLLM and HF keep it fp32).
        if name.endswith("e_score_correction_bias"):
            t = t.float()
        elif dtype and t.is_floating_point() and t.element_size() > 1:
            t = t.to(dtype)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = model.args.to_hf_dict()
    cfg["torch_dtype"] = str(dtype or model.lm_head.weight.dtype).removeprefix("torch.")
    if quantization:
        cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    if quantization == "fp8+fp4-experts":
        cfg["expert_dtype"] = "fp4"  # DeepSeek-V4's key; vLLM's DeepseekV3 path does not read MXFP4 experts
        cfg["dspost_vllm_unsupported"] = cfg.get("dspost_vllm_unsupported", []) + ["MXFP4 routed experts"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    elif model.source_path:
        for f in TOKENIZER_FILES:
            if (Path(model.source_path) / f).is_file():
                shutil.copy(Path(model.source_path) / f, out / f)


# ------------------------------------------------------------------------------------------ load
def read_config(path: str | os.PathLike) -> dict:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type") not in ("deepseek_v3", None):
        raise CheckpointError(f"{cfg_file}: model_type {cfg.get('model_type')!r} is not deepseek_v3")
    return cfg


def _tensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return files


def iter_checkpoint(path: str | os.PathLike, block_size: int = 128) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) one at a time; FP8 weights with `weight_scale_inv` come out dequantised."""
    for f in _tensor_files(Path(path)):
        with safe_open(str(f), framework="pt") as sf:
            keys = set(sf.keys())
            for name in sorted(keys):
                if name.endswith("_scale_inv"):
                    continue
                yield name, dequantized(name, sf.get_tensor(name), keys, sf.get_tensor, block_size, f.name)


def dequantized(name: str, t: torch.Tensor, keys, get, block_size: int = 128, where: str = "checkpoint") -> torch.Tensor:
    """A tensor of a quantised weight format (see `quantize_named`) back in fp32; others unchanged."""
    if t.dtype == torch.float8_e4m3fn:
        if name + "_scale_inv" not in keys:
            raise CheckpointError(f"{where}: FP8 tensor {name} has no {name}_scale_inv in the same shard")
        return weight_dequant(t, get(name + "_scale_inv"), block_size)
    if t.dtype in (torch.int8, torch.uint8) and name + "_scale_inv" in keys:  # MXFP4: E2M1 pairs + e8m0 scales
        scale = get(name + "_scale_inv")
        if scale.dtype != torch.float8_e8m0fnu and scale.dtype != torch.uint8:
            raise CheckpointError(f"{where}: MXFP4 tensor {name} has {scale.dtype} scales, expected e8m0")
        return mxfp4_dequant(t.view(torch.uint8), scale.view(torch.uint8))
    return t


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> DeepseekV3:
    path = Path(path)
    cfg = read_config(path)
    args = ModelArgs.from_dict(cfg)
    if args.num_nextn_predict_layers and not _has_layer(path, args.num_hidden_layers):
        # transformers drops MTP layers when it saves; the main model is complete without them.
        warnings.warn(f"{path}: config has {args.num_nextn_predict_layers} MTP layers but the checkpoint "
                      "holds none (written by transformers?); loading without MTP", stacklevel=2)
        args = args.replace(num_nextn_predict_layers=0, mtp_offsets=None)
    qcfg = cfg.get("quantization_config") or {}
    block = (qcfg.get("weight_block_size") or [128, 128])[0]
    if dtype is None:
        dtype = getattr(torch, str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"), torch.float32)
        dtype = torch.float32 if dtype not in (torch.float32, torch.bfloat16, torch.float16) else dtype
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = DeepseekV3(args)
    model = model.to(dtype).to_empty(device=device)
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    filled: set[str] = set()
    with torch.no_grad():
        for name, t in iter_checkpoint(path, block):
            if name.endswith("rotary_emb.inv_freq"):
                continue
            _load_one(model, targets, name, t, filled)
    expected = {n for n, _ in hf_tensors(model)} - _mtp_shared_names(args)
    missing = sorted(expected - filled)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[:3]}")
    model.reset_runtime_state()
    model.source_path = str(path)
    return model.eval()


def load_named(model: DeepseekV3, named, block_size: int = 128) -> int:
    """Load HF-named tensors, plain or in a weight format of `quantize_named`, into `model` in place (a
    receiver of quantise-on-sync); returns how many weights it set."""
    tensors = dict(named)
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    filled: set[str] = set()
    with torch.no_grad():
        for name, t in tensors.items():
            if not name.endswith("_scale_inv"):
                _load_one(model, targets, name, dequantized(name, t, tensors, tensors.__getitem__, block_size), filled)
    return len(filled)


def _has_layer(path: Path, layer: int) -> bool:
    prefix = f"model.layers.{layer}."
    for f in _tensor_files(path):
        with safe_open(str(f), framework="pt") as sf:
            if any(k.startswith(prefix) for k in sf.keys()):
                return True
    return False


def _mtp_shared_names(args: ModelArgs) -> set[str]:
    return {f"model.layers.{args.num_hidden_layers + k}.{leaf}"
            for k in range(args.num_nextn_predict_layers) for leaf in MTP_SHARED}


def _load_one(model: DeepseekV3, targets: dict, name: str, t: torch.Tensor, filled: set[str]) -> None:
    args = model.args
    if name in _mtp_shared_names(args) or name in SEQUENCE_HEADS:
        return
    m = _EXPERT_RE.match(name)
    if m:
        stacked = _from_hf_prefix(m[1], args)
        if stacked is None:
            return
        leaf, e = m[3], int(m[2])
        param_name = "gate_up_proj" if leaf in ("gate_proj", "up_proj") else "down_proj"
        dst = targets.get(f"{stacked}.{param_name}")
        if dst is None or e >= dst.shape[0]:
            raise CheckpointError(f"checkpoint tensor {name} does not fit this config")
        half = dict(EXPERT_TABLE[param_name])[leaf]
        dst = dst[e] if half is None else dst[e].chunk(2, dim=0)[half]
        _copy(dst, t, name)
        filled.add(name)
        return
    m = _STACKED_RE.match(name)  # transformers v5 may keep experts fused on disk
    if m:
        ours = f"{_from_hf_prefix(m[1], args)}.{m[2]}"
        _copy(targets[ours], t, name)
        filled.update(f"{m[1]}.{e}.{leaf}.weight" for e in range(targets[ours].shape[0])
                      for leaf, _ in EXPERT_TABLE[m[2]])
        return
    ours = _from_hf_prefix(name, args)
    if ours is None:
        return
    if ours not in targets:
        raise CheckpointError(f"checkpoint tensor {name} has no place in this model (config mismatch?)")
    _copy(targets[ours], t, name)
    filled.add(name)


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise CheckpointError(f"checkpoint tensor {name} has shape {tuple(src.shape)}, model expects {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))


def check_vllm_servable(path: str | os.PathLike) -> None:
    """Refuse a checkpoint that vLLM's DeepseekV3 path would serve as a different model (other architectures are
    vLLM's own to serve or refuse)."""
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file() and json.loads(cfg_file.read_text()).get("model_type") != "deepseek_v3":
        return
    cfg = read_config(path)
    args = ModelArgs.from_dict(cfg)
    unsupported = cfg.get("dspost_vllm_unsupported") or args.vllm_unsupported()
    if unsupported:
        raise CheckpointError(f"{path}: vLLM cannot serve this model faithfully: uses {', '.join(unsupported)}")
