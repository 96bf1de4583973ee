"""Several named data sources (domains) mixed by weight, each with its own held-out split.

`load_mixture(data)` reads `data.sources` (or, without them, the one domain-less source `data`'s own fields
describe) into a `Mixture` of training examples and one of held-out examples. Every example carries its domain
(`Example.domain`) through rollout, scoring and metrics. A step's batch takes each source's share of the
batch, in proportion to its weight, from that source's own shuffled stream: a pure function of (seed, step)
like the single-source order, which it equals when there is one source."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from dspost.config import DataSection
from dspost.data.loading import BadRows, DataError, Example, load_examples, synthetic_examples
from dspost.data.packing import batch_indices

T = TypeVar("T")


@dataclass
class Mixture(Generic[T]):
    """Items grouped by source (`parts[domain]`, in the recipe's order) and the sources' mixing weights. The flat
    order (`items`) is the parts one after another; `batch` indexes into it."""

    parts: dict[str | None, list[T]]
    weights: dict[str | None, float]

    @property
    def items(self) -> list[T]:
        return [x for part in self.parts.values() for x in part]

    @property
    def domains(self) -> list[str | None]:
        return list(self.parts)

    def map(self, fn: Callable[[str | None, list[T]], list]) -> Mixture:
        """The mixture of `fn(domain, part)` for every part (same domains and weights)."""
        return Mixture({d: fn(d, part) for d, part in self.parts.items()}, dict(self.weights))

    def shares(self, size: int) -> dict[str | None, int]:
        """How many of a batch of `size` each source gives: proportional to the weights, the remainder to the
        largest fractions (ties in the recipe's order). Refused when a source would give none."""
        total = sum(self.weights.values())
        exact = {d: size * w / total for d, w in self.weights.items()}
        counts = {d: int(x) for d, x in exact.items()}
        for d in sorted(exact, key=lambda d: counts[d] - exact[d])[: size - sum(counts.values())]:
            counts[d] += 1
        empty = [d for d, n in counts.items() if n == 0]
        if empty:
            raise DataError(f"data.sources: a batch of {size} gives source {empty[0]!r} no item at its weight; "
                            "raise the batch (rollout.prompts_per_step / trainer.batch_size) or that weight")
        return counts

    def batch(self, size: int, step: int, seed: int) -> list[int]:
        """Flat indices of step `step`'s batch: each source's share from its own epoch-wise shuffled stream."""
        if len(self.parts) == 1:  # one source: exactly the single-source order
            return batch_indices(len(self.items), size, step, seed)
        out, start = [], 0
        for k, (domain, n) in enumerate(self.shares(size).items()):
            part = len(self.parts[domain])
            out += [start + i for i in batch_indices(part, n, step, seed + 7919 * (k + 1))]
            start += part
        return out


def load_mixture(data: DataSection, need_targets: bool = True
                 ) -> tuple[Mixture[Example], Mixture[Example], dict[str | None, BadRows]]:
    """(train, held-out, bad rows per source) of a recipe's `data` section. `need_targets`: as `load_examples`
    (SFT needs an answer to train on; RL stages take prompts without one)."""
    if not data.sources:
        train, held_out, bad = load_examples(data, need_targets)
        return Mixture({None: train}, {None: 1.0}), Mixture({None: held_out}, {None: 1.0}), {None: bad}
    train, held_out, bad = {}, {}, {}
    for src in data.sources:
        if src.synthetic is not None:
            t, h = synthetic_examples(src.synthetic, src.num_train, src.num_eval, data.seed, src.difficulty)
            b = BadRows(total=len(t) + len(h))
        else:  # a file: the single-source reader, on this source's fields
            fields = {"path": src.path, "format": src.format, "columns": src.columns, "eval_path": src.eval_path,
                      "num_eval": src.num_eval, "sources": []}
            t, h, b = load_examples(data.model_copy(update=fields), need_targets)
        train[src.name] = [dataclasses.replace(ex, domain=src.name) for ex in t]
        held_out[src.name] = [dataclasses.replace(ex, domain=src.name) for ex in h]
        bad[src.name] = b
    weights = {s.name: s.weight for s in data.sources}
    return Mixture(train, weights), Mixture(held_out, dict(weights)), bad


def source_label(data: DataSection, domain: str | None) -> str:
    """What a source's bad-row errors name: its file, or the synthetic set."""
    if domain is None:
        return data.path or "synthetic data"
    src = next(s for s in data.sources if s.name == domain)
    return f"data.sources {domain} ({src.path or 'synthetic ' + src.synthetic})"
