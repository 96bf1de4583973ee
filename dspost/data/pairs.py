"""Preference pairs in, `Pair(prompt, chosen, rejected)` out, for reward-model training and evaluation.

Formats: `pairwise` (`prompt`, `chosen`, `rejected`), `llmbar` (`input`, `output_1`, `output_2`, `label` 1 or 2),
`hh_rlhf` (`chosen`/`rejected` transcripts of "Human:"/"Assistant:" turns that differ in the last reply).
Optional columns: `category` (per-category accuracy) and `answer` (a gold final answer for rule critics);
`data.columns` maps any of these names to the file's. Unset `data.path` gives synthetic math pairs: a worked
solution against the same solution ending in a wrong answer."""

from __future__ import annotations

import random
import re
from typing import Any

from pydantic import BaseModel

from dspost.data import synthetic_math
from dspost.data.loading import BadRow, BadRows, DataError, column, read_rows
from dspost.rewards.critics import Pair

PAIR_COLUMNS = {
    "pairwise": ("prompt", "chosen", "rejected"),
    "llmbar": ("input", "output_1", "output_2", "label"),
    "hh_rlhf": ("chosen", "rejected"),
}
_ASSISTANT = "\n\nAssistant:"


def detect_pair_format(row: dict[str, Any], fmt: str, columns: dict[str, str]) -> str:
    if fmt in PAIR_COLUMNS:
        return fmt
    if fmt != "auto":
        raise DataError(f"data.format: {fmt!r} is not a preference-pair format (one of {sorted(PAIR_COLUMNS)}, or auto)")
    for name, cols in PAIR_COLUMNS.items():
        if all(columns.get(c, c) in row for c in cols):
            return name
    raise DataError(f"data.format: cannot infer a preference-pair format from columns {sorted(row)}; "
                    f"expected one of {PAIR_COLUMNS} (or map columns with data.columns)")


def to_pair(row: dict[str, Any], fmt: str, columns: dict[str, str]) -> Pair:
    def col(name: str, required: bool = True) -> Any:
        return column(row, columns, name, required)

    extra = {"category": col("category", False), "answer": col("answer", False)}
    extra = {k: (str(v) if v is not None else None) for k, v in extra.items()}
    if fmt == "pairwise":
        return Pair(str(col("prompt")), str(col("chosen")), str(col("rejected")), **extra)
    if fmt == "llmbar":
        label = col("label")
        if str(label) not in ("1", "2"):
            raise BadRow(f"'{columns.get('label', 'label')}' is not 1 or 2")
        a, b = str(col("output_1")), str(col("output_2"))
        chosen, rejected = (a, b) if str(label) == "1" else (b, a)
        return Pair(str(col("input")), chosen, rejected, **extra)
    if fmt == "hh_rlhf":
        chosen, rejected = str(col("chosen")), str(col("rejected"))
        ci, ri = chosen.rfind(_ASSISTANT), rejected.rfind(_ASSISTANT)
        if ci < 0 or ri < 0:
            raise BadRow("transcript has no 'Assistant:' turn")
        if chosen[:ci] != rejected[:ri]:
            raise BadRow("chosen and rejected transcripts differ before the last reply")
        reply_c, reply_r = chosen[ci + len(_ASSISTANT):].strip(), rejected[ri + len(_ASSISTANT):].strip()
        if not reply_c or not reply_r:
            raise BadRow("empty final reply")
        return Pair(chosen[:ci].strip(), reply_c, reply_r, **extra)
    raise DataError(f"data.format: unknown pair format {fmt!r}")


def read_pairs(path: str, fmt: str = "auto", columns: dict[str, str] | None = None) -> tuple[list[Pair], BadRows]:
    columns = columns or {}
    rows = read_rows(path)
    if not rows:
        raise DataError(f"data.path: {path}: no rows")
    fmt = detect_pair_format(rows[0], fmt, columns)
    bad, pairs = BadRows(total=len(rows)), []
    for i, row in enumerate(rows):
        try:
            pairs.append(to_pair(row, fmt, columns))
        except BadRow as e:
            bad.add(i, str(e))
    return pairs, bad


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def synthetic_pairs(problems: list[synthetic_math.Problem], seed: int) -> list[Pair]:
    """Each worked solution against itself with the boxed answer replaced by a nearby wrong number."""
    rng = random.Random(seed)
    out = []
    for p in problems:
        try:
            value = int(p.answer)
        except ValueError:
            wrong = p.answer + "1"
        else:
            wrong = str(value + rng.choice([-3, -2, -1, 1, 2, 3]))
        rejected = _BOXED.sub(lambda m: "\\boxed{" + wrong + "}", p.solution)
        out.append(Pair(p.question, p.solution, rejected, category=f"level{p.level}", answer=p.answer))
    return out


def load_pairs(data: BaseModel) -> tuple[list[Pair], list[Pair], BadRows]:
    """(train, held-out, bad rows) of a recipe's `data` section."""
    if data.path is None:
        train, held_out = synthetic_math.splits(data.num_train, data.num_eval, data.seed, data.difficulty)
        return (synthetic_pairs(train, data.seed), synthetic_pairs(held_out, data.seed + 1),
                BadRows(total=len(train) + len(held_out)))
    train, bad = read_pairs(data.path, data.format, data.columns)
    if data.eval_path:
        held_out, bad_eval = read_pairs(data.eval_path, data.format, data.columns)
        bad.total += bad_eval.total
        for reason, n in bad_eval.reasons.items():
            bad.reasons[reason] += n
            bad.first.setdefault(reason, len(train) + bad_eval.first[reason])
    else:
        n_eval = min(data.num_eval, max(len(train) // 10, 1))
        train, held_out = train[:-n_eval], train[-n_eval:]
    bad.check(data.max_bad_fraction, data.path)
    return train, held_out, bad
