"""Packed SFT rows: a sample's last position has no target (its next token is another sample's first), so a
packed row trains exactly like the samples padded apart. Every sample here has a label on every token,
its first included, so a target crossing a boundary would count if the masking were missing."""

import pytest
import torch

from dspost.model import DeepseekV3
from dspost.data.packing import Tokenized, collate, collate_packed, one_row, pack
from tests.model.conftest import small_args

LENGTHS = (7, 5, 9, 4, 6)


def fully_labelled(seed: int = 0) -> list[Tokenized]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in LENGTHS:
        ids = torch.randint(6, 90, (n,), generator=g).tolist()
        samples.append(Tokenized(ids, list(ids)))  # every token is a target, the first one too
    return samples


def test_collate_packed_drops_the_targets_that_cross_a_sample_boundary():
    samples = fully_labelled()
    rows = pack(samples, max_len=16)
    ids, labels, segments, positions = collate_packed(rows, pad_id=0)
    assert [r.segments for r in rows][:2] == [[0] * 7 + [1] * 5, [0] * 9 + [1] * 4]
    # row 0 holds samples 0 (7 tokens) and 1 (5 tokens): position t targets token t+1 of the same sample only
    want = samples[0].input_ids[1:] + [-100] + samples[1].input_ids[1:] + [-100] + [-100] * (ids.shape[1] - 12)
    assert labels[0].tolist() == want
    assert positions[0, :12].tolist() == list(range(7)) + list(range(5))
    assert int((labels != -100).sum()) == sum(n - 1 for n in LENGTHS)


@pytest.mark.parametrize("layout", ["packed rows", "one padding-free row"])
def test_fully_labelled_packed_rows_give_the_padded_batch_losses(layout):
    """Next-token and MTP losses (offsets 1 and 2) of packed rows equal those of the samples padded apart."""
    model = DeepseekV3(small_args(num_nextn_predict_layers=2)).init_weights(0).eval()
    samples = fully_labelled(1)
    rows = pack(samples, max_len=16) if layout == "packed rows" else [one_row(samples)]
    with torch.no_grad():
        padded = model(*collate(samples, pad_id=0))
        ids, labels, segments, positions = collate_packed(rows, pad_id=0)
        packed = model(ids, labels=labels, segment_ids=segments, position_ids=positions)
    assert packed.lm_loss.item() == pytest.approx(padded.lm_loss.item(), abs=1e-5)
    assert len(packed.mtp_losses) == 2
    for got, want in zip(packed.mtp_losses, padded.mtp_losses):
        assert got.item() == pytest.approx(want.item(), abs=1e-5)
