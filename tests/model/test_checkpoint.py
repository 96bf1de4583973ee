"""Checkpoint contract: hub layout, FP8 (DeepSeek block format) dequant on load, shards, atomic writes."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dspost.kernels import weight_dequant, weight_quant
from dspost.model import CheckpointError, from_pretrained, hf_tensors
from dspost.model.checkpoint import atomic_dir
from tests.model.conftest import random_model, small_args


def test_hub_layout(tmp_path):
    model = random_model(small_args())
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["topk_method"] == "noaux_tc"
    assert cfg["scoring_func"] == "sigmoid" and "num_hash_layers" not in cfg  # plain V3 stays plain
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    n = model.args.num_hidden_layers
    for e in range(model.args.n_routed_experts):
        assert f"model.layers.1.mlp.experts.{e}.gate_proj.weight" in keys
        assert f"model.layers.1.mlp.experts.{e}.down_proj.weight" in keys
    for leaf in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight"):
        assert f"model.layers.{n}.{leaf}" in keys  # MTP at num_hidden_layers, as vLLM expects
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # the dense first layer


def test_roundtrip_is_exact(tmp_path):
    model = random_model(small_args(num_nextn_predict_layers=1))
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    for (a, ta), (b, tb) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert a == b and torch.equal(ta, tb), a


def test_sharded_save_and_load(tmp_path):
    model = random_model(small_args())
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded = from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def _write_fp8(src, dst):
    """Quantise every projection and expert weight into DeepSeek's FP8 block format (128x128, scale_inv)."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(cfg))
    out, deq = {}, {}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            quantise = t.dim() == 2 and ("proj" in k) and "eh_proj" not in k and "embed" not in k
            if quantise:
                q, s = weight_quant(t)
                out[k], out[k + "_scale_inv"] = q, s
                deq[k] = weight_dequant(q, s)
            else:
                out[k] = deq[k] = t
    save_file(out, str(dst / "model.safetensors"))
    return deq


def test_fp8_checkpoint_dequantises_on_load(tmp_path):
    model = random_model(small_args(hidden_size=160, moe_intermediate_size=48))  # ragged 128-blocks too
    model.save_pretrained(tmp_path / "bf")
    deq = _write_fp8(tmp_path / "bf", tmp_path / "fp8")
    loaded = from_pretrained(tmp_path / "fp8")
    names = dict(hf_tensors(loaded))
    for k, t in deq.items():
        assert torch.equal(names[k], t), k
    w = dict(hf_tensors(model))["model.layers.0.self_attn.q_a_proj.weight"]
    q_err = (names["model.layers.0.self_attn.q_a_proj.weight"] - w).abs().max()
    assert 0 < q_err <= w.abs().max() / 16  # e4m3 keeps 3 mantissa bits: relative error <= 2^-4


def test_fp8_tensor_without_scale_is_refused(tmp_path):
    model = random_model(small_args())
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.self_attn.o_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no .*weight_scale_inv"):
        from_pretrained(tmp_path)


def test_missing_and_mismatched_tensors_are_named(tmp_path):
    model = random_model(small_args())
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="experts.3.up_proj"):
        from_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        from_pretrained(tmp_path)


def test_atomic_dir_leaves_nothing_on_crash(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.safetensors").write_text("x")
            raise RuntimeError("crash mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_save_replaces_existing(tmp_path):
    a, b = random_model(small_args(), seed=0), random_model(small_args(), seed=1)
    a.save_pretrained(tmp_path / "c")
    b.save_pretrained(tmp_path / "c")
    loaded = from_pretrained(tmp_path / "c")
    assert torch.equal(loaded.lm_head.weight, b.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(tmp_path)


def test_bf16_load(tmp_path):
    model = random_model(small_args())
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32


def test_atomic_dir_fsyncs_what_it_publishes_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b))[1])
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "model.safetensors").write_bytes(b"w" * 100)
        (tmp / "sub" / "config.json").write_text("{}")
    (publish,) = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(target)]
    before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    assert before == {str(tmp / "model.safetensors"), str(tmp / "sub" / "config.json"), str(tmp / "sub"), str(tmp)}
    assert ("fsync", str(tmp_path)) in events[publish:]  # the rename itself is made durable
    assert (target / "sub" / "config.json").read_text() == "{}"


def test_atomic_dir_removes_dead_writers_temporaries_of_its_target_and_not_live_ones(tmp_path):
    from dspost.model.checkpoint import atomic_dir

    target = tmp_path / "ckpt"
    (tmp_path / ".ckpt.tmp-123").mkdir()  # a killed writer's (its lock died with it)
    (tmp_path / ".other.tmp-123").mkdir()  # another target's: not this writer's business
    with atomic_dir(target) as outer:
        (outer / "w").write_text("outer")
        with atomic_dir(target) as inner:  # a second writer while the first is live
            (inner / "w").write_text("inner")
        assert outer.is_dir() and (target / "w").read_text() == "inner"
    assert (target / "w").read_text() == "outer"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-123", "ckpt"]


KILLED_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from dspost.model.checkpoint import atomic_dir
target = Path(sys.argv[1])
with atomic_dir(target) as tmp:
    (tmp / "w").write_text("first")
real, calls = os.rename, []
def rename(a, b):
    calls.append(a)
    if len(calls) == 2:  # the old directory is aside, the new one not yet in place
        os._exit(9)
    real(a, b)
os.rename = rename
with atomic_dir(target) as tmp:
    (tmp / "w").write_text("second")
"""


def test_a_writer_killed_between_its_renames_leaves_the_replaced_directory_restored(tmp_path):
    import subprocess
    import sys

    from dspost.model.checkpoint import clean_stale_temporaries

    target = tmp_path / "step_2"
    assert subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(target)]).returncode == 9
    assert not target.exists() and len(list(tmp_path.iterdir())) == 2  # aside and new, both hidden
    assert len(clean_stale_temporaries(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["step_2"] and (target / "w").read_text() == "first"
