"""Weight sync into a running vLLM engine, routed experts included.

Unchanged weights in -> bit-identical logprobs out; changed weights in -> exactly the logprobs of a freshly
started engine on the same checkpoint. The expert-less control shows the probe sees the experts."""

import pytest
import torch

from dspost.model import from_pretrained, hf_tensors
from dspost.rollout.sync import SyncError, make_buckets, unpack_bucket
from tests.conftest import fresh_engine_logprobs

pytestmark = pytest.mark.vllm


def _named(model):
    return list(hf_tensors(model, include_mtp=False))


def _sync(engine, named, bucket_bytes=1 << 20):
    return engine.update_weights(unpack_bucket(b) for b in make_buckets(named, bucket_bytes))


def _probe(engine, model):
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, model.args.vocab_size, (n,), generator=g).tolist() for n in (12, 30, 47)]
    return seqs, engine.sequence_logprobs(seqs)


def test_sync_unchanged_then_changed_weights(vllm_engine, served_checkpoint, tmp_path):
    path, _ = served_checkpoint
    model = from_pretrained(path)
    seqs, before = _probe(vllm_engine, model)

    n = _sync(vllm_engine, _named(model))
    assert n == len(_named(model))
    _, after = _probe(vllm_engine, model)
    assert after == before  # bit-identical, experts included

    with torch.no_grad():  # perturb every tensor, the router bias and all experts included
        g = torch.Generator().manual_seed(1)
        for _, t in hf_tensors(model):
            t.add_(torch.randn(t.shape, generator=g) * 0.02)
    model.save_pretrained(tmp_path / "changed")
    expected = fresh_engine_logprobs(tmp_path / "changed", seqs)

    # Control: without the routed experts the engine is not the changed model.
    _sync(vllm_engine, [(k, t) for k, t in _named(model) if ".mlp.experts." not in k])
    partial = vllm_engine.sequence_logprobs(seqs)
    assert max(abs(a - b) for x, y in zip(partial, expected) for a, b in zip(x, y)) > 1e-3

    _sync(vllm_engine, _named(model), bucket_bytes=300_000)  # many buckets, experts split across them
    synced = vllm_engine.sequence_logprobs(seqs)
    assert synced == expected  # exactly the freshly started engine's logprobs

    _sync(vllm_engine, _named(from_pretrained(path)))  # restore for the other tests of the session
    assert _probe(vllm_engine, model)[1] == before


def test_corrupted_bucket_is_refused():
    bucket = next(make_buckets([("w", torch.ones(8))], 1 << 20))
    bucket.data[3] ^= 0xFF
    with pytest.raises(SyncError, match="checksum"):
        unpack_bucket(bucket)


def test_buckets_roundtrip_all_dtypes():
    named = [("a", torch.randn(3, 5)), ("b", torch.arange(7)), ("c", torch.randn(4).bfloat16())]
    buckets = list(make_buckets(named, 40))
    assert len(buckets) > 1
    out = [x for b in buckets for x in unpack_bucket(b)]
    assert [n for n, _ in out] == ["a", "b", "c"] and all(torch.equal(x, y) for (_, x), (_, y) in zip(out, named))
