"""Preference pairs in, `Pair(prompt, chosen, rejected)` out, for reward-model training and evaluation.

Formats: `pairwise` (`prompt`, `chosen`, `rejected`), `llmbar` (`input`, `output_1`, `output_2`, `label` 1 or 2),
`hh_rlhf` (`chosen`/`rejected` transcripts of "Human:"/"Assistant:" turns that differ in the last reply).
Optional columns: `category` (per-category accuracy) and `answer` (a gold final answer for rule critics);
`data.columns` maps any of these names to the file's. Unset `data.path` gives synthetic math pairs: a worked
solution against the same solution ending in a wrong answer.

Files are read as examples are (`loading.read_file`), and nothing is dropped or changed silently: a row that
cannot be a pair (a line that is not JSON, a missing value, a list of chat messages where text is expected, a
label other than 1 or 2) is a bad row counted under its reason, pointing back to its file and line."""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any

from dspost.config import DataSection
from dspost.data import synthetic_math
from dspost.data.loading import BadRow, BadRows, DataError, Table, read_file, split, text
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


def pair_format(table: Table, fmt: str, columns: dict[str, str]) -> str:
    """The format of the first readable row whose columns name one (a malformed first row does not decide it).
    With no readable row every row is already bad and none is converted: `fmt` is returned as given."""
    if fmt != "auto":
        return detect_pair_format({}, fmt, columns)  # a pair format, or one line naming them
    readable = [r for r in table.rows if isinstance(r, dict)]
    if not readable:
        return fmt
    for row in readable:
        try:
            return detect_pair_format(row, fmt, columns)
        except DataError:
            continue
    return detect_pair_format(readable[0], fmt, columns)  # none does: the error names the first row's columns


def to_pair(row: dict[str, Any], fmt: str, columns: dict[str, str]) -> Pair:
    """One row as a pair; every value must be text as written (`loading.text`: a number is its digits, a list or
    a boolean is a bad row), so a chat-format `chosen` is never trained on as the repr of a list."""
    def txt(name: str, required: bool = True) -> str | None:
        return text(row, columns, name, required)

    extra = {"category": txt("category", False), "answer": txt("answer", False)}
    if fmt == "pairwise":
        return Pair(txt("prompt"), txt("chosen"), txt("rejected"), **extra)
    if fmt == "llmbar":
        label = txt("label")  # 1 and "1" alike (JSON and CSV); 1.0, " 1" and True are not labels
        if label not in ("1", "2"):
            raise BadRow(f"'{columns.get('label', 'label')}' is not 1 or 2")
        a, b = txt("output_1"), txt("output_2")
        chosen, rejected = (a, b) if label == "1" else (b, a)
        return Pair(txt("input"), chosen, rejected, **extra)
    if fmt == "hh_rlhf":
        chosen, rejected = txt("chosen"), txt("rejected")
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


def _convert(table: Table, offset: int, fmt: str, columns: dict[str, str], bad: BadRows) -> list[Pair]:
    """The table's pairs, each numbered `offset` + its row; the rest counted in `bad` (which learns the table)."""
    bad.sources.append((offset, table))
    bad.total += len(table.rows)
    out = []
    for n, row in enumerate(table.rows):
        try:
            if isinstance(row, BadRow):
                raise row
            p = to_pair(row, fmt, columns)
        except BadRow as e:
            bad.add(offset + n, str(e))
            continue
        out.append(dataclasses.replace(p, row=offset + n))
    return out


def read_pairs(path: str, fmt: str = "auto", columns: dict[str, str] | None = None) -> tuple[list[Pair], BadRows]:
    """The pairs of one file (`data.path`) and its bad rows; the caller checks those against its limit."""
    columns = columns or {}
    table = _rows(path)
    bad = BadRows()
    return _convert(table, 0, pair_format(table, fmt, columns), columns, bad), bad


def _rows(path: str) -> Table:
    table = read_file(path, "data.path")
    if not table.rows:
        raise DataError(f"data.path: {path}: no rows")
    return table


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def synthetic_pairs(problems: list[synthetic_math.Problem], seed: int, start: int = 0) -> list[Pair]:
    """Each worked solution against itself with the boxed answer replaced by a nearby wrong number; rows are
    numbered from `start` (as `BadRows` counts the synthetic set: training pairs, then held-out ones)."""
    rng = random.Random(seed)
    out = []
    for i, p in enumerate(problems):
        try:
            value = int(p.answer)
        except ValueError:
            wrong = p.answer + "1"
        else:
            wrong = str(value + rng.choice([-3, -2, -1, 1, 2, 3]))
        rejected = _BOXED.sub(lambda m: "\\boxed{" + wrong + "}", p.solution)
        out.append(Pair(p.question, p.solution, rejected, category=f"level{p.level}", answer=p.answer, row=start + i))
    return out


def load_pairs(data: DataSection) -> tuple[list[Pair], list[Pair], BadRows]:
    """(train, held-out, bad rows) of a recipe's `data` section, split as examples are (`loading.split`):
    held out is all of `eval_path`, else the last min(num_eval, 10% of the usable pairs, at least 1) pairs of
    `path`. The format is decided on `path`; the rows of `eval_path` are numbered after all of `path`'s."""
    if data.path is None:
        train, held_out = synthetic_math.splits(data.num_train, data.num_eval, data.seed, data.difficulty)
        return (synthetic_pairs(train, data.seed), synthetic_pairs(held_out, data.seed + 1, len(train)),
                BadRows(total=len(train) + len(held_out)))
    tables = [_rows(data.path)] + ([read_file(data.eval_path, "data.eval_path")] if data.eval_path else [])
    fmt, bad = pair_format(tables[0], data.format, data.columns), BadRows()
    parts = [_convert(table, bad.total, fmt, data.columns, bad) for table in tables]  # each after the last's rows
    bad.check(data.max_bad_fraction, data.path)
    train, held_out = split(parts, data.num_eval, data.path, data.eval_path)
    return train, held_out, bad
