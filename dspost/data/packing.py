"""How samples become batches: padded rows, rows packed with several samples (attention, positions and targets
restarting per sample), and the first-fit packing of the RL update; plus the data order, a pure function of
(seed, step) so a resumed run sees the batches an uninterrupted one would."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Tokenized:
    """One sample's token ids and its labels (-100 where no loss is taken)."""
    input_ids: list[int]
    labels: list[int]


def collate(batch: list[Tokenized], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, S] right-padded to the longest sample, and next-token labels [B, S]."""
    # Right padding under a causal mask never reaches real tokens, so no attention mask is needed.
    S = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), S), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), S), -100, dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
    # Next-token targets: position t predicts t+1.
    return ids, torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)


@dataclass
class Packed:
    """Several tokenized samples in one row: `segments[i]` numbers the sample each token belongs to."""
    input_ids: list[int]
    labels: list[int]
    segments: list[int]


def pack(samples: list[Tokenized], max_len: int) -> list[Packed]:
    """Next-fit in data order: rows of at most `max_len` tokens. A sample's last label is dropped
    (its next token is another sample's first)."""
    rows: list[Packed] = []
    for s in samples:
        row = rows[-1] if rows and len(rows[-1].input_ids) + len(s.input_ids) <= max_len else None
        if row is None:
            row = Packed([], [], [])
            rows.append(row)
        seg = row.segments[-1] + 1 if row.segments else 0
        row.input_ids += s.input_ids
        row.labels += s.labels
        row.segments += [seg] * len(s.input_ids)
    return rows


def one_row(items: list[Tokenized] | list[Packed]) -> Packed:
    """Samples, or packed rows (their segments renumbered), as one row."""
    row = Packed([], [], [])
    for item in items:
        segments = item.segments if isinstance(item, Packed) else [0] * len(item.input_ids)
        first = row.segments[-1] + 1 if row.segments else 0
        row.input_ids += item.input_ids
        row.labels += item.labels
        row.segments += [first + s for s in segments]
    return row


def collate_packed(batch: list[Packed], pad_id: int):
    """ids, next-token labels, segment ids (padding is segment -1) and positions restarting per sample; rows
    padded to the longest."""
    S = max(len(r.input_ids) for r in batch)
    ids = torch.full((len(batch), S), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), S), -100, dtype=torch.long)
    segments = torch.full((len(batch), S), -1, dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r.input_ids)
        ids[i, :n], labels[i, :n], segments[i, :n] = (torch.tensor(r.input_ids), torch.tensor(r.labels),
                                                     torch.tensor(r.segments))
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    index = torch.arange(S).expand(len(batch), S)
    positions = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
    next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    same = torch.nn.functional.pad(segments[:, 1:] == segments[:, :-1], (0, 1), value=False)
    return ids, next_labels.masked_fill(~same, -100), segments, positions


def first_fit_decreasing(lengths: list[int], row_len: int) -> list[list[int]]:
    """Indices of sequences of `lengths` grouped into rows of at most `row_len` tokens, longest first, each into
    the first row it fits (a longer sequence gets a row of its own): the RL update's rows, whose order does not
    matter."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, u in enumerate(used) if u + lengths[i] <= row_len), len(rows))
        if r == len(rows):
            rows.append([])
            used.append(0)
        rows[r].append(i)
        used[r] += lengths[i]
    return rows


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of step `step` (0-based) in an epoch-wise shuffled stream; a pure function of its inputs."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        take = min(batch_size - len(out), n - offset)
        out += perm[offset: offset + take]
        pos += take
    return out
