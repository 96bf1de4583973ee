"""MTP on packed rows: module k (offset o) predicts token t+1+o from position t, and only when that token is
in t's own sequence. Labels here are on every token (no prompt to hide a crossing target), the main
next-token targets already cut at the boundaries; so only the model's own MTP masking keeps module k from
scoring the next sequence's first tokens."""

import pytest
import torch
import torch.nn.functional as F

from dspost.model import DeepseekV3
from tests.model.conftest import small_args


@pytest.mark.parametrize("offsets", [None, (1, 3)])
def test_packed_mtp_losses_equal_the_sequences_one_by_one(offsets):
    model = DeepseekV3(small_args(num_nextn_predict_layers=2, mtp_offsets=offsets)).init_weights(0).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(6, 90, (n,), generator=g) for n in (9, 6, 11)]
    ids = torch.cat(seqs)[None]
    segment_ids = torch.cat([torch.full((len(s),), k) for k, s in enumerate(seqs)])[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    # next-token labels on every token; the last position of each sequence has none
    labels = torch.cat([F.pad(s[1:], (0, 1), value=-100) for s in seqs])[None]
    with torch.no_grad():
        packed = model(ids, labels=labels, segment_ids=segment_ids, position_ids=position_ids)
        alone = [model(s[None], labels=F.pad(s[1:], (0, 1), value=-100)[None]) for s in seqs]
    for k, offset in enumerate(model.args.offsets):
        counts = [max(len(s) - 1 - offset, 0) for s in seqs]  # targets of module k in each sequence alone
        want = sum(a.mtp_losses[k].item() * c for a, c in zip(alone, counts)) / sum(counts)
        assert packed.mtp_losses[k].item() == pytest.approx(want, abs=1e-5), f"MTP module {k} (offset {offset})"
    counts = [len(s) - 1 for s in seqs]
    want = sum(a.lm_loss.item() * c for a, c in zip(alone, counts)) / sum(counts)
    assert packed.lm_loss.item() == pytest.approx(want, abs=1e-5)
