"""Rows in, chat messages out: the built-in synthetic set or a user file read through `datasets`.

Formats: chat (`messages`), prompt/completion, GSM8K (`question`, `answer` ending in `#### N`), MATH
(`problem`, `solution`/`answer`). `data.columns` maps our column names to the file's. Malformed rows are
counted by reason; a run stops only when they exceed `data.max_bad_fraction`."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dspost.data import synthetic_math

FORMAT_COLUMNS = {
    "code": ("prompt", "test", "entry_point"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "gsm8k": ("question", "answer"),
    "math": ("problem", "answer"),
}
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


class DataError(ValueError):
    pass


class BadRow(ValueError):
    """A row that cannot be used; the message is the reason it is counted under."""


@dataclass
class Example:
    messages: list[dict[str, str]]  # the full conversation, last turn the assistant's target
    answer: str | None = None  # gold final answer, when the format has one (for verifiers)
    extra: dict[str, Any] = field(default_factory=dict)  # other fields rewards read (code: tests, entry_point)


@dataclass
class BadRows:
    total: int = 0
    reasons: Counter = field(default_factory=Counter)
    first: dict[str, int] = field(default_factory=dict)

    def add(self, row: int, reason: str) -> None:
        self.reasons[reason] += 1
        self.first.setdefault(reason, row)

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def check(self, limit: float, source: str) -> None:
        if self.total and self.count / self.total > limit:
            worst, n = self.reasons.most_common(1)[0]
            raise DataError(f"{source}: {self.count}/{self.total} rows are bad (limit data.max_bad_fraction="
                            f"{limit}); most common: {worst} ({n} rows, first at row {self.first[worst]})")

    def summary(self) -> str:
        return ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common()) or "none"


def read_rows(path: str) -> list[dict[str, Any]]:
    import datasets

    p = Path(path)
    datasets.disable_progress_bars()
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(p.suffix)
        if p.name.endswith((".jsonl.gz", ".json.gz")):
            kind = "json"
        if kind is None:
            raise DataError(f"data.path: {path}: unsupported file type (jsonl, json, parquet, csv, or a datasets dir)")
        try:
            ds = datasets.load_dataset(kind, data_files=str(p), split="train")
        except Exception as e:  # datasets wraps parse errors in several types
            raise DataError(f"data.path: {path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return list(ds)


def detect_format(row: dict[str, Any], fmt: str, columns: dict[str, str]) -> str:
    if fmt != "auto":
        return fmt
    have = set(row)
    for name, cols in FORMAT_COLUMNS.items():
        if all(columns.get(c, c) in have for c in cols):
            return name
    if {"problem", "solution"} <= have:
        return "math"
    raise DataError(f"data.format: cannot infer the format from columns {sorted(have)}; "
                    f"set data.format or map columns with data.columns")


def column(row: dict[str, Any], columns: dict[str, str], name: str, required: bool = True) -> Any:
    """The row's value for our column `name` (renamed by `data.columns`); a missing or blank required one is a
    bad row."""
    key = columns.get(name, name)
    value = row.get(key)
    if required and (value is None or (isinstance(value, str) and not value.strip())):
        raise BadRow(f"missing or empty '{key}'")
    return value


def to_example(row: dict[str, Any], fmt: str, columns: dict[str, str]) -> Example:
    def col(name: str, required: bool = True) -> Any:
        return column(row, columns, name, required)

    if fmt == "chat":
        msgs = col("messages")
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs):
            raise BadRow("'messages' is not a list of {role, content}")
        if msgs[-1]["role"] != "assistant" or not str(msgs[-1]["content"]).strip():
            raise BadRow("conversation does not end in a non-empty assistant turn")
        return Example(messages=[{"role": m["role"], "content": str(m["content"])} for m in msgs])
    if fmt == "code":  # HumanEval: complete the function; graded by running `test` with `check(entry_point)`
        prompt, tests, entry = str(col("prompt")), str(col("test")), str(col("entry_point"))
        solution = col("canonical_solution", required=False) or ""
        ask = f"Complete this Python function. Reply with the whole function in a ```python block.\n\n{prompt}"
        return Example([{"role": "user", "content": ask},
                        {"role": "assistant", "content": f"```python\n{prompt}{solution}```"}],
                       extra={"tests": tests, "entry_point": entry, "prompt": prompt})
    if fmt == "prompt_completion":
        return Example([{"role": "user", "content": str(col("prompt"))},
                        {"role": "assistant", "content": str(col("completion"))}])
    if fmt == "gsm8k":
        question, answer = str(col("question")), str(col("answer"))
        m = _GSM8K_FINAL.search(answer)
        if not m:
            raise BadRow("GSM8K answer has no '#### N' line")
        final = m[1].replace(",", "").strip()
        steps = re.sub(r"<<.*?>>", "", answer[: m.start()]).strip()
        solution = f"{steps}\nThe answer is \\boxed{{{final}}}."
        return Example([{"role": "user", "content": question}, {"role": "assistant", "content": solution}], final)
    if fmt == "math":
        problem = str(col("problem"))
        answer = col("answer", required=False)
        solution = col("solution", required=False)
        if not answer and not solution:
            raise BadRow("MATH row has neither 'answer' nor 'solution'")
        if not answer:
            answer = last_boxed(str(solution))
            if answer is None:
                raise BadRow("MATH solution has no \\boxed{} answer")
        target = str(solution) if solution else f"The answer is \\boxed{{{answer}}}."
        return Example([{"role": "user", "content": problem}, {"role": "assistant", "content": target}], str(answer))
    raise DataError(f"data.format: unknown format {fmt!r}")


def last_boxed(text: str) -> str | None:
    i = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if i < 0:
        return None
    start = text.index("{", i) + 1
    depth = 1
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[start:j]
    return None


def load_examples(data: BaseModel) -> tuple[list[Example], list[Example], BadRows]:
    """(train, held-out, bad-row report) for a recipe's `data` section."""
    if data.path is None:
        train, held_out = synthetic_math.splits(data.num_train, data.num_eval, data.seed, data.difficulty)
        conv = lambda ps: [Example(synthetic_math.messages(p), p.answer) for p in ps]  # noqa: E731
        return conv(train), conv(held_out), BadRows(total=len(train) + len(held_out))
    rows = read_rows(data.path)
    if not rows:
        raise DataError(f"data.path: {data.path}: no rows")
    eval_rows = read_rows(data.eval_path) if data.eval_path else None
    fmt = detect_format(rows[0], data.format, data.columns)
    bad = BadRows(total=len(rows) + len(eval_rows or []))

    def convert(part: list[dict[str, Any]], offset: int) -> list[Example]:
        out = []
        for i, row in enumerate(part):
            try:
                out.append(to_example(row, fmt, data.columns))
            except BadRow as e:
                bad.add(offset + i, str(e))
        return out

    train = convert(rows, 0)
    held_out = convert(eval_rows, len(rows)) if eval_rows is not None else None
    bad.check(data.max_bad_fraction, data.path)
    if held_out is None:
        n_eval = min(data.num_eval, max(len(train) // 10, 1))
        train, held_out = train[:-n_eval], train[-n_eval:]
    return train, held_out, bad
