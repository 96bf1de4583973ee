"""Weight sync into a running vLLM engine, routed experts included.

Unchanged weights in -> bit-identical logprobs out; changed weights in (all of them, or a subset as a LoRA
merge sends) -> exactly the logprobs of a freshly started engine on the changed checkpoint, sync after sync.
The expert-less control shows the probe sees the experts."""

from pathlib import Path

import pytest
import torch

from dspost.model import from_pretrained, hf_tensors
from dspost.rollout.sync import NCCLTransport, SharedSegment, SyncError, make_buckets, shared_weights, unpack_bucket


def probe(engine, seqs: list[list[int]]) -> list:
    """Prefill logprobs of whole sequences, and a greedy continuation's tokens and logprobs: decode steps
    are what read MLA's absorbed W_UK_T / W_UV (the CPU backend's prefill uses kv_b_proj itself)."""
    from dspost.rollout.engine import SamplingConfig

    decode = engine.generate([s[:8] for s in seqs], SamplingConfig(n=1, temperature=0.0, max_tokens=8), 0, seed=0)
    return [engine.sequence_logprobs(seqs), [[s.response_ids, s.logprobs] for s in decode]]


def probe_seqs(vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in (12, 30, 47)]


# What a LoRA merge on attention would send (plus a few experts and a norm): one layer's projections.
SUBSET_PREFIXES = ("model.layers.1.self_attn.", "model.layers.2.mlp.experts.2.", "model.layers.2.mlp.experts.3.",
                   "model.layers.2.mlp.experts.5.", "model.norm.")


def in_subset(name: str) -> bool:
    return name.startswith(SUBSET_PREFIXES) and "layernorm" not in name


@pytest.fixture(scope="module")
def changed_checkpoints(served_checkpoint, tmp_path_factory):
    """Two checkpoints derived from the served one and each one's logprobs from a freshly started engine:
    'all' perturbs every tensor (router bias and experts included), 'subset' only the `in_subset` tensors.
    Both engines start at once, each in its own process."""
    import json
    import subprocess
    import sys

    path, _ = served_checkpoint
    out = {}
    for kind in ("all", "subset"):
        model = from_pretrained(path)
        g = torch.Generator().manual_seed(1 if kind == "all" else 2)
        with torch.no_grad():
            for name, t in hf_tensors(model):
                if kind == "all" or in_subset(name):
                    t.add_(torch.randn(t.shape, generator=g) * 0.02)
        d = tmp_path_factory.mktemp(f"changed-{kind}")
        model.save_pretrained(d)
        out[kind] = (d, model)
    seqs = probe_seqs(model.args.vocab_size)
    code = ("import json, sys; from dspost.rollout.engine import VLLMEngine; "
            "from tests.rollout.test_weight_sync import probe; "
            "e = VLLMEngine(sys.argv[1], max_model_len=256, kv_cache_gb=1); "
            "print('RESULT' + json.dumps(probe(e, json.loads(sys.argv[2]))))")
    procs = {k: subprocess.Popen([sys.executable, "-c", code, str(d), json.dumps(seqs)], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, cwd=Path(__file__).resolve().parents[2]) for k, (d, _) in out.items()}
    expected = {}
    for k, p in procs.items():
        stdout, _ = p.communicate()
        assert p.returncode == 0, f"fresh engine on the '{k}' checkpoint failed"
        expected[k] = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT"))[6:])
    return {k: (model, expected[k]) for k, (_, model) in out.items()}


def _named(model, keep=lambda name: True):
    return [(k, t) for k, t in hf_tensors(model, include_mtp=False) if keep(k)]


def _sync(engine, named, wire="buckets", bucket_bytes=1 << 20, hosted: SharedSegment | None = None):
    """Through object-store buckets (each tensor its own array: the engine stacks fused pairs and experts
    through copies) or the shared-memory file (laid out back to back: the engine packs straight from it)."""
    if wire == "shared":
        segment = SharedSegment()  # the file lives as long as its segment
        return engine.update_weights(segment.write(named).open({}, ""))
    if wire == "hosted":  # read where they lie in `hosted`, the model's file; nothing may be copied
        shared, staged = shared_weights(named, hosted, SharedSegment())
        assert staged == 0
        return engine.update_weights(shared.open({}, ""))
    return engine.update_weights([p for b in make_buckets(named, bucket_bytes) for p in unpack_bucket(b)])


@pytest.mark.vllm
def test_sync_unchanged_then_changed_weights(vllm_engine, served_checkpoint, changed_checkpoints):
    path, _ = served_checkpoint
    base = from_pretrained(path)
    seqs = probe_seqs(base.args.vocab_size)
    before = probe(vllm_engine, seqs)
    changed, expected = changed_checkpoints["all"]

    for wire in ("buckets", "shared"):
        assert _sync(vllm_engine, _named(base), wire) == len(_named(base))
        assert probe(vllm_engine, seqs) == before, wire  # bit-identical, experts included

    # Control: without the routed experts the engine is not the changed model.
    _sync(vllm_engine, _named(changed, lambda k: ".mlp.experts." not in k))
    partial = probe(vllm_engine, seqs)
    assert max(abs(a - b) for x, y in zip(partial[0], expected[0]) for a, b in zip(x, y)) > 1e-3

    _sync(vllm_engine, _named(changed), bucket_bytes=300_000)  # many buckets, experts split across them
    assert probe(vllm_engine, seqs) == expected  # exactly the freshly started engine's logprobs
    _sync(vllm_engine, _named(base))
    _sync(vllm_engine, _named(changed), "shared")
    assert probe(vllm_engine, seqs) == expected

    # The trainer's parameters hosted in the shared file: a push reads their current values in place, so an
    # in-place change (an optimizer step) reaches the engine with the next push.
    hosted, segment = from_pretrained(path), SharedSegment()
    assert segment.host(list(hosted.state_dict(keep_vars=True).values()))
    _sync(vllm_engine, _named(changed))
    _sync(vllm_engine, _named(hosted), "hosted", hosted=segment)
    assert probe(vllm_engine, seqs) == before
    with torch.no_grad():
        for (_, t), (_, c) in zip(_named(hosted), _named(changed)):
            t.copy_(c)
    _sync(vllm_engine, _named(hosted), "hosted", hosted=segment)
    assert probe(vllm_engine, seqs) == expected

    _sync(vllm_engine, _named(base))  # restore for the other tests of the session
    assert probe(vllm_engine, seqs) == before


@pytest.mark.vllm
def test_subset_syncs_in_a_row_match_fresh_engines(vllm_engine, served_checkpoint, changed_checkpoints):
    """Only one layer's attention projections, three experts of another layer and the final norm are sent
    (as a LoRA merge would); the fused q_a/kv_a handle, the MLA matrices absorbed from kv_b_proj and the
    packed expert slots must all follow, sync after sync."""
    path, _ = served_checkpoint
    base = from_pretrained(path)
    seqs = probe_seqs(base.args.vocab_size)
    before = probe(vllm_engine, seqs)
    subset, expected_subset = changed_checkpoints["subset"]
    changed, expected_all = changed_checkpoints["all"]
    sent = _named(subset, in_subset)
    assert {k.split(".")[-2] for k, _ in sent} >= {"q_a_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "up_proj"}

    for step, (named, wire, expected) in enumerate([(sent, "shared", expected_subset),
                                                    (_named(changed), "buckets", expected_all),
                                                    (_named(base), "shared", before), (sent, "buckets", expected_subset)]):
        _sync(vllm_engine, named, wire)
        assert probe(vllm_engine, seqs) == expected, f"sync {step} ({wire})"

    _sync(vllm_engine, _named(base))
    assert probe(vllm_engine, seqs) == before


@pytest.mark.vllm
def test_half_of_a_fused_pair_is_refused(vllm_engine, served_checkpoint):
    """A packed projection keeps no unpacked copy: half of a fused pair cannot be applied, and says so."""
    base = from_pretrained(served_checkpoint[0])
    half = _named(base, lambda k: k == "model.layers.1.self_attn.q_a_proj.weight")
    with pytest.raises(Exception, match="fused_qkv_a_proj is fused from 2 checkpoint tensors"):
        _sync(vllm_engine, half)
    gate_only = _named(base, lambda k: k == "model.layers.1.mlp.experts.0.gate_proj.weight")
    with pytest.raises(Exception, match="gate_proj and up_proj must be sent together"):
        _sync(vllm_engine, gate_only)


def test_corrupted_bucket_is_refused():
    bucket = next(make_buckets([("w", torch.ones(8))], 1 << 20))
    bucket.arrays = [a.copy() for a in bucket.arrays]
    bucket.arrays[0][3] ^= 0xFF
    with pytest.raises(SyncError, match="checksum"):
        unpack_bucket(bucket)


def test_buckets_roundtrip_all_dtypes():
    named = [("a", torch.randn(3, 5)), ("b", torch.arange(7)), ("c", torch.randn(4).bfloat16()),
             ("d", torch.randn(6, 4).t()), ("e", torch.tensor(2.5))]
    buckets = list(make_buckets(named, 40))
    assert len(buckets) > 1
    out = [x for b in buckets for x in unpack_bucket(b)]
    assert [n for n, _ in out] == [n for n, _ in named] and all(torch.equal(x, y) for (_, x), (_, y) in zip(out, named))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_nccl_transport_refuses_on_cpu_in_one_line():
    with pytest.raises(SyncError, match="needs CUDA devices") as e:
        NCCLTransport(1 << 20)
    assert "\n" not in str(e.value)


def test_shared_segment_roundtrip_rewrite_and_growth():
    import os

    named = [("a", torch.randn(3, 5)), ("b", torch.arange(7)), ("c", torch.randn(4).bfloat16()),
             ("d", torch.randn(6, 4).t()), ("e", torch.tensor(2.5))]
    seg = SharedSegment()
    first = seg.write(named)
    maps: dict = {}
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(first.open(maps, ""), named))
    again = seg.write([(k, t + 1) for k, t in named])  # rewritten in place: the same file, already mapped
    assert again.files == first.files
    assert all(torch.equal(x, y + 1) for (_, x), (_, y) in zip(again.open(maps, ""), named))
    f = torch.randn(100)
    bigger = seg.write(named + [("f", f)])  # a new file; the old one is unlinked
    assert bigger.files != first.files and not os.path.exists(first.files[0][0])
    assert torch.equal(bigger.open(maps, "")[-1][1], f)
    del seg
    assert not os.path.exists(bigger.files[0][0])


def test_hosted_parameters_are_pushed_in_place():
    """`SharedSegment.host` moves a model's parameters into the shared file (same Parameter objects, same values,
    an optimizer still steps them); a push of its checkpoint tensors then copies nothing and the worker's views
    are the parameters' current bytes. A tensor that no longer lies there is copied, not lost."""
    from dspost.model import DeepseekV3, tiny_math

    model = DeepseekV3(tiny_math(num_hidden_layers=2)).init_weights(0)
    params = list(model.parameters())
    hosted = [*params, *(b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))]
    before = [p.detach().clone() for p in params]
    seg = SharedSegment()
    assert seg.host(hosted)
    assert all(p is q and torch.equal(p, b) for p, q, b in zip(params, model.parameters(), before))
    named = _named(model)
    shared, staged = shared_weights(named, seg, SharedSegment())
    assert staged == 0 and [f for f, _ in shared.files] == [seg.path]
    maps: dict = {}
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(shared.open(maps, ""), named))

    opt = torch.optim.AdamW(params, lr=0.1)
    model(torch.tensor([[3, 4, 5, 6]])).logits.float().mean().backward()
    opt.step()  # in place, into the file
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    stepped = shared_weights(named, seg, SharedSegment())[0].open(maps, "")
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(stepped, _named(model)))

    moved = params[0]
    moved.data = moved.data.clone()  # e.g. a load that replaced the storage: that tensor is staged, the rest not
    staging = SharedSegment()
    shared, staged = shared_weights(_named(model), seg, staging)
    assert staged == moved.numel() * moved.element_size() and len(shared.files) == 2
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(shared.open(maps, ""), _named(model)))
