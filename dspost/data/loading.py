"""Rows in, chat messages out: the built-in synthetic set or a user file.

Formats: chat (`messages`), prompt/completion, GSM8K (`question`, `answer` ending in `#### N`), MATH
(`problem`, `solution`/`answer`), IFEval (`prompt`, `instruction_id_list`, `kwargs`: prompts without an answer,
for RL; SFT counts them as bad rows). `data.columns` maps our column names to the file's. Nothing is dropped or
changed silently: a row that cannot be used (a line that is not JSON, a missing or non-text value, a message
with a field we would drop) is counted as bad under its reason and first row; a run stops when they exceed
`data.max_bad_fraction`, or when too few usable rows are left to train on and hold out.

Files: JSON lines (`.jsonl`, `.json` not starting with `[`, either gzipped) are read one line at a time with
`json`, so one torn line is one bad row, not a failed file, and values keep their JSON types (the `datasets`
JSON loader rejects the whole file on one bad line and unifies types across rows: `1` next to `2.5` becomes
`1.0`). A `.json` array must parse as a whole (else one error with its line and column). CSV is read with
`csv`, every field as written (pandas turns `NA`, `null`, `nan` into missing values and `007` into 7).
Parquet files and saved `datasets` directories are read through `datasets`."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from dspost.config import DataSection
from dspost.data import synthetic_instruct, synthetic_math

FORMAT_COLUMNS = {
    "code": ("prompt", "test", "entry_point"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "gsm8k": ("question", "answer"),
    "math": ("problem", "answer"),
    "ifeval": ("prompt", "instruction_id_list", "kwargs"),
}
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)
_BOM = "\ufeff"

Row = dict[str, Any]
T = TypeVar("T")


class DataError(ValueError):
    pass


class BadRow(ValueError):
    """A row that cannot be used; the message is the reason it is counted under."""


@dataclass
class Example:
    messages: list[dict[str, str]]  # the full conversation, last turn the assistant's target
    answer: str | None = None  # gold final answer, when the format has one (for verifiers)
    extra: dict[str, Any] = field(default_factory=dict)  # other fields rewards read (code: tests, entry_point)
    row: int | None = None  # the row it came from, numbered as in `BadRows` (None: synthetic)
    target: bool = True  # False: no answer to train on (IFEval prompts); the last turn is an empty placeholder,
    # so that `messages[:-1]` is the prompt as for every other row
    domain: str | None = None  # the data source it came from (`data.sources[].name`; None: a single source)


@dataclass
class Table:
    """A data file's rows in file order; a row that could not be read is a `BadRow`."""
    path: str
    rows: list[Row | BadRow]
    lines: list[int] | None = None  # text files: the 1-based line each row starts on (blank lines are no rows)

    def where(self, i: int) -> str:
        """`row 3 of x.jsonl (line 5)`: the 0-based row (as `datasets` counts) and the line (as editors do)."""
        line = f" (line {self.lines[i]})" if self.lines and i < len(self.lines) else ""
        return f"row {i} of {self.path}{line}"

    @staticmethod
    def numbered(path: str, rows: Iterable[tuple[int, Row | BadRow]]) -> Table:
        """A table of a text file from (0-based line, row) pairs."""
        rows = list(rows)
        return Table(path, [r for _, r in rows], [n + 1 for n, _ in rows])


@dataclass
class BadRows:
    """Bad rows counted by reason, each with its first row. Rows are numbered from 0 on across the files read
    together (those of `eval_path` after those of `path`); `sources` holds each file's first number and table,
    so that `where` names the file and line back."""
    total: int = 0
    reasons: Counter = field(default_factory=Counter)
    first: dict[str, int] = field(default_factory=dict)
    sources: list[tuple[int, Table]] = field(default_factory=list)

    def add(self, row: int, reason: str) -> None:
        self.reasons[reason] += 1
        self.first.setdefault(reason, row)

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def where(self, row: int) -> str:
        for start, table in reversed(self.sources):
            if row >= start:
                return table.where(row - start)
        return f"row {row}"

    def check(self, limit: float, source: str) -> None:
        if self.total and self.count / self.total > limit:
            worst, n = self.reasons.most_common(1)[0]
            raise DataError(f"{source}: {self.count}/{self.total} rows are bad (limit data.max_bad_fraction="
                            f"{limit}); most common: {worst} ({n} rows, first at {self.where(self.first[worst])})")

    def summary(self) -> str:
        return ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common()) or "none"


# ---------------------------------------------------------------------------------------------- files
def read_file(path: str, name: str = "data.path") -> Table:
    """Every row of the file (or `datasets` directory) at `path`; `name` is the recipe field for errors."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{name}: {path} does not exist")
    if p.is_dir():
        return Table(path, _saved_dataset(p, name))
    suffix = p.name.removesuffix(".gz").rsplit(".", 1)[-1] if "." in p.name else ""
    if suffix not in ("jsonl", "json", "csv", "parquet"):
        raise DataError(f"{name}: {path}: unsupported file type (jsonl, json, parquet, csv, their .gz, or a "
                        f"datasets directory)")
    if suffix == "parquet":
        return Table(path, _parquet(p, name))
    with _open(p, name) as f:
        try:
            if suffix == "csv":
                return Table.numbered(path, _csv_rows(f, f"{name}: {path}"))
            if suffix == "json" and _starts_with(f, b"["):
                return Table(path, list(_json_array(f.read(), f"{name}: {path}")))
            return Table.numbered(path, _json_lines(f))
        except (EOFError, OSError, zlib.error) as e:  # a torn .gz: the rows after the tear are lost, unknown how many
            what = "cannot be read to the end" if isinstance(e, EOFError) else "cannot be read"
            raise DataError(f"{name}: {path}: {what} ({type(e).__name__}: {e})") from None


def read_rows(path: str) -> list[Row]:
    """The rows of a file, for callers that do not count bad rows: a row that cannot be read is an error."""
    table = read_file(path)
    for i, row in enumerate(table.rows):
        if isinstance(row, BadRow):
            raise DataError(f"data.path: {table.where(i)}: {row}")
    return table.rows


def _open(p: Path, name: str) -> IO[bytes]:
    try:
        return gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb")
    except OSError as e:
        raise DataError(f"{name}: {p}: cannot be opened ({e.strerror or e})") from None


def _starts_with(f: IO[bytes], prefix: bytes) -> bool:
    """Whether the first non-blank bytes (after a byte-order mark) are `prefix`; leaves `f` at its start."""
    head = f.read(4096).removeprefix(_BOM.encode()).lstrip()
    f.seek(0)
    return head.startswith(prefix)


class _Decoder:
    """`json` decoding that notices a key given twice in an object (plain `json` keeps the last silently)."""

    def __init__(self):
        self.duplicate = False
        self.decoder = json.JSONDecoder(object_pairs_hook=self._object)

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(pairs)
        self.duplicate |= len(d) != len(pairs)
        return d

    def row(self, value: Any) -> Row | BadRow:
        """`value` as a row, or why it is not one (checks, then forgets, a duplicate key seen decoding it)."""
        duplicate, self.duplicate = self.duplicate, False
        if duplicate:
            return BadRow("a JSON object has the same key twice")
        return value if isinstance(value, dict) else BadRow(f"row is {_kind(value)}, not a JSON object")


def _json_lines(lines: Iterable[bytes]) -> Iterator[tuple[int, Row | BadRow]]:
    """JSON lines numbered by line; blank lines are not rows."""
    dec = _Decoder()
    for i, raw in enumerate(lines):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield i, BadRow("not valid UTF-8")
            continue
        line = line.removeprefix(_BOM) if i == 0 else line
        if not line.strip():
            continue
        try:
            value = dec.decoder.decode(line)
        except json.JSONDecodeError:
            dec.duplicate = False
            yield i, BadRow("not valid JSON")
            continue
        yield i, dec.row(value)


def _json_array(data: bytes, where: str) -> Iterator[Row | BadRow]:
    """The elements of a JSON array, decoded one at a time so that one element's duplicate key is one bad row;
    text that does not parse is an error with its line and column (after it nothing can be trusted)."""
    try:
        text = data.decode("utf-8").removeprefix(_BOM)
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 at byte {e.start}") from None
    dec, blank = _Decoder(), re.compile(r"[ \t\n\r]*")
    i = blank.match(text, text.index("[") + 1).end()
    if text.startswith("]", i):
        i = blank.match(text, i + 1).end()
    else:
        while True:
            try:
                value, i = dec.decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
            yield dec.row(value)
            i = blank.match(text, i).end()
            if text.startswith(",", i):
                i = blank.match(text, i + 1).end()
            elif text.startswith("]", i):
                i = blank.match(text, i + 1).end()
                break
            else:
                raise DataError(f"{where}: not valid JSON at {_line_col(text, i)}: expecting ',' or ']'")
    if i != len(text):
        raise DataError(f"{where}: not valid JSON at {_line_col(text, i)}: extra data after the array")


def _line_col(text: str, i: int) -> str:
    return f"line {text.count(chr(10), 0, i) + 1} column {i - text.rfind(chr(10), 0, i)}"


def _csv_rows(f: IO[bytes], where: str) -> Iterator[tuple[int, Row | BadRow]]:
    """CSV records as strings exactly as written, numbered by the 0-based line each starts on; a record with
    more or fewer fields than the header is a bad row (a missing field is not an empty one)."""
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    reader = csv.reader(text)
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # the default 128 KiB per field is shorter than some completions
    try:
        header = next(reader, None)
        if header is None:
            return
        if len(set(header)) != len(header):
            twice = sorted({h for h in header if header.count(h) > 1})
            raise DataError(f"{where}: the header names {twice} more than once")
        while True:
            start = reader.line_num
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{where}: line {start + 1}: {e}") from None
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 after line {start} ({e.reason})") from None
            if not fields:  # a blank line
                continue
            if len(fields) != len(header):
                yield start, BadRow("CSV record has a different number of fields than the header")
            else:
                yield start, dict(zip(header, fields))
    finally:
        csv.field_size_limit(limit)
        text.detach()


def _parquet(p: Path, name: str) -> list[Row]:
    import datasets

    datasets.disable_progress_bars()
    try:
        return list(datasets.load_dataset("parquet", data_files=str(p), split="train"))
    except Exception as e:  # datasets wraps parse errors in several types
        raise DataError(f"{name}: {p}: cannot be read ({type(e).__name__}: {_first_line(e)})") from None


def _saved_dataset(p: Path, name: str) -> list[Row]:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # not a saved dataset (an empty or unrelated directory): FileNotFoundError and others
        raise DataError(f"{name}: {p}: not a saved datasets directory ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{name}: {p}: a dataset with splits {sorted(ds)} and no 'train' split")
        ds = ds["train"]
    return list(ds)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0]


# ----------------------------------------------------------------------------------------------- rows
def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")


def detect_format(row: Row, fmt: str, columns: dict[str, str]) -> str:
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


def file_format(rows: list[Row], fmt: str, columns: dict[str, str]) -> str:
    """The format of the first row whose columns name one (a malformed first row does not decide it)."""
    for row in rows:
        try:
            return detect_format(row, fmt, columns)
        except DataError:
            continue
    return detect_format(rows[0], fmt, columns)  # none does: the error names the first row's columns


def column(row: Row, columns: dict[str, str], name: str, required: bool = True) -> Any:
    """The row's value for our column `name` (renamed by `data.columns`); a missing or blank required one is a
    bad row."""
    key = columns.get(name, name)
    value = row.get(key)
    if required and (value is None or (isinstance(value, str) and not value.strip())):
        raise BadRow(f"missing or empty '{key}'")
    return value


def text(row: Row, columns: dict[str, str], name: str, required: bool = True) -> str | None:
    """The row's value for our column `name` as text; None when optional and missing (null or blank: a present
    `0` or `"0"` is a value). Numbers are written back exactly (`str`: an int's digits, a float's shortest
    round-trip form), because typed storage (Parquet, saved datasets, JSON) hands an all-numeric column over
    as numbers; booleans, lists, objects and non-finite numbers are bad rows, as their text would be a guess."""
    key = columns.get(name, name)
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise BadRow(f"'{key}' is not a finite number")
        value = str(value)
    elif value is not None and not isinstance(value, str):
        raise BadRow(f"'{key}' is {_kind(value)}, not text")
    if value is None or not value.strip():
        if required:
            raise BadRow(f"missing or empty '{key}'")
        return None
    return value


def chat_messages(msgs: Any, key: str) -> list[dict[str, str]]:
    """A conversation as `{role, content}` string pairs, ending in a non-empty assistant turn that follows a user
    turn (GRPO prompts and critics read the last user turn). Content must be a string: null, a number or a list
    of parts in a message means a tool call, a multimodal turn or a broken writer, which turned into text would
    be trained on as something nobody wrote. A field other than role and content that holds a value (e.g.
    `reasoning_content`, `tool_calls`, `weight`) is a bad row: dropping it would change the conversation; a null
    one is what columnar formats add to messages that lack a field, and is ignored."""
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs):
        raise BadRow(f"'{key}' is not a list of {{role, content}}")
    if not msgs:
        raise BadRow(f"'{key}' is empty")
    out = []
    for m in msgs:
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or not role.strip():
            raise BadRow(f"a message's 'role' is {_kind(role) if not isinstance(role, str) else 'blank'}")
        if not isinstance(content, str):
            raise BadRow(f"a message's 'content' is {_kind(content)}, not a string")
        dropped = sorted(k for k, v in m.items() if k not in ("role", "content") and v is not None)
        if dropped:
            raise BadRow(f"a message has fields that would be dropped: {dropped}")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant" or not out[-1]["content"].strip():
        raise BadRow("conversation does not end in a non-empty assistant turn")
    if not any(m["role"] == "user" for m in out[:-1]):
        raise BadRow("conversation has no user turn before the final assistant turn")
    return out


def to_example(row: Row, fmt: str, columns: dict[str, str]) -> Example:
    def txt(name: str, required: bool = True) -> str | None:
        return text(row, columns, name, required)

    if fmt == "chat":
        return Example(chat_messages(column(row, columns, "messages"), columns.get("messages", "messages")))
    if fmt == "code":  # HumanEval: complete the function; graded by running `test` with `check(entry_point)`
        prompt, tests, entry = txt("prompt"), txt("test"), txt("entry_point")
        solution = txt("canonical_solution", required=False) or ""
        ask = f"Complete this Python function. Reply with the whole function in a ```python block.\n\n{prompt}"
        return Example([{"role": "user", "content": ask},
                        {"role": "assistant", "content": f"```python\n{prompt}{solution}```"}],
                       extra={"tests": tests, "entry_point": entry, "prompt": prompt})
    if fmt == "prompt_completion":
        return Example([{"role": "user", "content": txt("prompt")},
                        {"role": "assistant", "content": txt("completion")}])
    if fmt == "gsm8k":
        question, answer = txt("question"), txt("answer")
        m = _GSM8K_FINAL.search(answer)
        if not m:
            raise BadRow("GSM8K answer has no '#### N' line")
        final = m[1].replace(",", "").strip()
        if not final:
            raise BadRow("GSM8K '#### N' line is empty")
        steps = re.sub(r"<<.*?>>", "", answer[: m.start()]).strip()
        solution = f"{steps}\nThe answer is \\boxed{{{final}}}."
        return Example([{"role": "user", "content": question}, {"role": "assistant", "content": solution}], final)
    if fmt == "math":
        problem, answer, solution = txt("problem"), txt("answer", required=False), txt("solution", required=False)
        if answer is None and solution is None:
            raise BadRow("MATH row has neither 'answer' nor 'solution'")
        if answer is None:
            answer = last_boxed(solution)
            if answer is None:
                raise BadRow("MATH solution has no \\boxed{} answer")
            if not answer.strip():
                raise BadRow("MATH solution's \\boxed{} answer is empty")
        target = solution if solution is not None else f"The answer is \\boxed{{{answer}}}."
        return Example([{"role": "user", "content": problem}, {"role": "assistant", "content": target}], answer)
    if fmt == "ifeval":
        return ifeval_example(row, columns)
    raise DataError(f"data.format: unknown format {fmt!r}")


def ifeval_example(row: Row, columns: dict[str, str]) -> Example:
    """An IFEval prompt for RL, graded by the `ifeval` reward through `extra`. A row the checks cannot grade
    repeatably (an unknown id, missing or unusable kwargs, a check that needs NLTK data this machine lacks) is
    a bad row naming the id."""
    from dspost.rewards.ifeval import MISSING, ifeval_problem, registry

    prompt = text(row, columns, "prompt")
    ids, kwargs = column(row, columns, "instruction_id_list"), column(row, columns, "kwargs")
    try:
        checkers = registry()
    except ImportError:
        raise DataError(f"data.format=ifeval: {MISSING}") from None
    if problem := ifeval_problem(ids, kwargs, checkers, probe=True):
        raise BadRow(problem)
    return Example([{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}],
                   extra={"instruction_id_list": list(ids), "kwargs": [dict(k) for k in kwargs], "prompt": prompt},
                   target=False)


def instruct_example(p: synthetic_instruct.Problem) -> Example:
    """A synthetic instruction-following problem, graded by the `instruct` reward through `extra`."""
    return Example(synthetic_instruct.messages(p), p.answer,
                   extra={"instruction_id_list": list(p.instruction_id_list), "kwargs": [dict(k) for k in p.kwargs]})


def synthetic_examples(domain: str, num_train: int, num_eval: int, seed: int,
                       levels: list[int]) -> tuple[list[Example], list[Example]]:
    """(train, held-out) of a built-in synthetic domain: `math` (levels 1-7) or `instruct` (levels 1-2), each
    with its fixed held-out split."""
    if domain == "math":
        train, held_out = synthetic_math.splits(num_train, num_eval, seed, levels)
        return ([Example(synthetic_math.messages(p), p.answer) for p in train],
                [Example(synthetic_math.messages(p), p.answer) for p in held_out])
    if domain == "instruct":
        train, held_out = synthetic_instruct.splits(num_train, num_eval, seed, levels)
        return [instruct_example(p) for p in train], [instruct_example(p) for p in held_out]
    raise DataError(f"data: unknown synthetic domain {domain!r} (math, instruct)")


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


# ------------------------------------------------------------------------------------------ load
def load_examples(data: DataSection, need_targets: bool = True) -> tuple[list[Example], list[Example], BadRows]:
    """(train, held-out, bad-row report) for a recipe's `data` section. Held out: all of `eval_path`, else the
    last min(num_eval, 10% of the usable rows, at least 1) usable rows of `path`. `need_targets` (SFT): a row
    without an answer to train on (an IFEval prompt) is a bad row; RL stages pass False."""
    if data.path is None:
        train, held_out = synthetic_examples("math", data.num_train, data.num_eval, data.seed, data.difficulty)
        return train, held_out, BadRows(total=len(train) + len(held_out))
    tables = [read_file(data.path, "data.path")]
    if data.eval_path:
        tables.append(read_file(data.eval_path, "data.eval_path"))
    if not tables[0].rows:
        raise DataError(f"data.path: {data.path}: no rows")
    readable = [r for r in tables[0].rows if isinstance(r, dict)]
    fmt = file_format(readable, data.format, data.columns) if readable else data.format  # else all rows are bad
    bad, parts, start = BadRows(), [], 0
    for table in tables:
        bad.sources.append((start, table))
        bad.total += len(table.rows)
        parts.append(_convert(table, start, fmt, data.columns, bad, need_targets))
        start += len(table.rows)
    bad.check(data.max_bad_fraction, data.path)
    train, held_out = split(parts, data.num_eval, data.path, data.eval_path)
    return train, held_out, bad


def _convert(table: Table, offset: int, fmt: str, columns: dict[str, str], bad: BadRows,
             need_targets: bool = True) -> list[Example]:
    out = []
    for n, row in enumerate(table.rows):
        try:
            if isinstance(row, BadRow):
                raise row
            ex = to_example(row, fmt, columns)
            if need_targets and not ex.target:
                raise BadRow(f"no answer to train on ({fmt} rows are prompts for RL stages)")
        except BadRow as e:
            bad.add(offset + n, str(e))
            continue
        ex.row = offset + n
        out.append(ex)
    return out


def split(parts: list[list[T]], num_eval: int, path: str, eval_path: str | None) -> tuple[list[T], list[T]]:
    """(train, held-out) from the usable examples (or pairs) of `path` (and of `eval_path`): a run needs one of
    each (an empty training set has no batch, an empty held-out set no accuracy), else one line with the counts."""
    if len(parts) == 2:
        train, held_out = parts
        if not train:
            raise DataError(f"data.path: {path}: no usable rows; at least 1 is needed to train on")
        if not held_out:
            raise DataError(f"data.eval_path: {eval_path}: no usable rows; at least 1 is needed to hold out")
        return train, held_out
    (usable,) = parts
    if len(usable) < 2:
        raise DataError(f"data.path: {path}: {len(usable)} usable row{'s' if len(usable) != 1 else ''}; at least 2 "
                        f"are needed (1 to train on, 1 held out), or give the held-out rows in data.eval_path")
    n_eval = min(num_eval, max(len(usable) // 10, 1))
    return usable[:-n_eval], usable[-n_eval:]
