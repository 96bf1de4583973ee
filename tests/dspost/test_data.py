import gzip
import json

import pytest

from dspost.config import DataSection
from dspost.data import synthetic_math
from dspost.data.loading import DataError, load_examples
from dspost.rewards import verify_math


def test_synthetic_split_is_fixed_and_disjoint():
    train, held = synthetic_math.splits(500, 50, 0, [1, 2, 3, 4])
    again, held2 = synthetic_math.splits(800, 50, 0, [1, 2, 3, 4])
    assert held == held2  # the held-out split does not depend on the training size
    assert not {p.question for p in train} & {p.question for p in held}
    for p in train[:200]:
        assert verify_math(p.solution, p.answer).status == "correct", p


def test_gsm8k_and_math_files(tmp_path, data_dir):
    gsm = load_examples(DataSection(path=str(data_dir / "gsm8k" / "test.jsonl"), num_eval=50))
    train, held, bad = gsm
    assert bad.count == 0 and len(held) == 50 and train[0].answer and "\\boxed" in train[0].messages[-1]["content"]
    math500 = load_examples(DataSection(path=str(data_dir / "math500" / "test.jsonl"), num_eval=20))
    assert math500[2].count == 0 and all(ex.answer for ex in math500[0])


def test_column_mapping_and_unknown_format(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"q": "1+1?", "a": "#### 2"}) + "\n" + json.dumps({"q": "2+0?", "a": "#### 2"}) + "\n")
    train, held, _ = load_examples(DataSection(path=str(f), format="gsm8k", columns={"question": "q", "answer": "a"},
                                               num_eval=1))
    assert held[0].answer == "2"
    f.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(DataError, match="cannot infer the format"):
        load_examples(DataSection(path=str(f)))


# ------------------------------------------------------------------- nothing lost or changed silently
def write_jsonl(path, rows, tail: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def chat_row(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def load(path, **kw):
    return load_examples(DataSection(path=str(path), **kw))


@pytest.mark.parametrize("where", [0, 10, 20])
@pytest.mark.parametrize("gz", [False, True])
def test_a_torn_json_line_is_one_bad_row(tmp_path, where, gz):
    lines = [json.dumps(chat_row(i)) for i in range(20)]
    lines.insert(where, json.dumps(chat_row(99))[:25])  # cut off mid-string, as a killed writer leaves it
    data = ("\n".join(lines) + "\n").encode()
    f = tmp_path / ("x.jsonl.gz" if gz else "x.jsonl")
    f.write_bytes(gzip.compress(data) if gz else data)
    train, held, bad = load(f, num_eval=2)
    assert dict(bad.reasons) == {"not valid JSON": 1} and bad.total == 21
    assert bad.where(bad.first["not valid JSON"]) == f"row {where} of {f} (line {where + 1})"
    assert [ex.messages[0]["content"] for ex in train + held] == [f"q{i}" for i in range(20)]


def test_a_torn_gzip_stream_is_an_error_not_a_shorter_file(tmp_path):
    data = gzip.compress(b"".join(json.dumps(chat_row(i)).encode() + b"\n" for i in range(2000)))
    f = tmp_path / "x.jsonl.gz"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"x\.jsonl\.gz: cannot be read to the end"):
        load(f)


def test_a_json_array_that_does_not_parse_names_the_file_and_position(tmp_path):
    f = tmp_path / "x.json"
    f.write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": "a" "completion": "b"}]')
    with pytest.raises(DataError, match=r"data\.path: .*x\.json: not valid JSON at line 2 column 17"):
        load(f)
    f.write_text('[{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}')
    with pytest.raises(DataError, match=r"x\.json: not valid JSON at line 1 column 72"):
        load(f)


@pytest.mark.parametrize("line, reason", [
    ('[1, 2]', "row is a list, not a JSON object"),
    ('"text"', "row is a string, not a JSON object"),
    ('{"messages": [{"role": "user", "content": "q", "content": "r"}, {"role": "assistant", "content": "a"}]}',
     "a JSON object has the same key twice"),
    (b'{"messages": "\xff"}', "not valid UTF-8"),
])
def test_lines_that_are_not_rows_are_counted(tmp_path, line, reason):
    f = write_jsonl(tmp_path / "x.jsonl", [chat_row(i) for i in range(30)])
    f.write_bytes(f.read_bytes() + (line if isinstance(line, bytes) else line.encode()) + b"\n\n")
    train, held, bad = load(f, num_eval=3)
    assert dict(bad.reasons) == {reason: 1} and bad.where(bad.first[reason]) == f"row 30 of {f} (line 31)"
    assert len(train) + len(held) == 30


def turns(*pairs, **fields):
    return {"messages": [{"role": r, "content": c, **fields} for r, c in pairs]}


@pytest.mark.parametrize("row, reason", [
    ({"messages": []}, "'messages' is empty"),
    (turns(("user", None), ("assistant", "a")), "a message's 'content' is null, not a string"),
    (turns(("user", "q"), ("assistant", 42)), "a message's 'content' is a number, not a string"),
    (turns(("user", [{"type": "text", "text": "q"}]), ("assistant", "a")),
     "a message's 'content' is a list, not a string"),
    (turns(("user", "q"), (None, "a")), "a message's 'role' is null"),
    (turns(("user", "q"), ("assistant", "a"), reasoning_content="think"),
     "a message has fields that would be dropped: ['reasoning_content']"),
    (turns(("system", "s"), ("assistant", "a")), "conversation has no user turn before the final assistant turn"),
    (turns(("user", "q"), ("assistant", "  ")), "conversation does not end in a non-empty assistant turn"),
])
def test_chat_rows_that_would_be_mangled_are_bad_rows(tmp_path, row, reason):
    f = write_jsonl(tmp_path / "x.jsonl", [chat_row(i) for i in range(30)] + [row])
    train, held, bad = load(f, num_eval=3)
    assert dict(bad.reasons) == {reason: 1} and len(train) + len(held) == 30


def test_null_fields_of_columnar_messages_are_not_data(tmp_path):
    # Parquet and `datasets` give every message every field any message has, null where it had none.
    f = write_jsonl(tmp_path / "x.jsonl", [turns(("user", "q"), ("assistant", "a"), name=None)] * 2)
    train, held, bad = load(f)
    assert bad.count == 0
    assert train[0].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("row, answer", [
    ({"problem": "p", "answer": 0}, "0"),
    ({"problem": "p", "answer": "0"}, "0"),
    ({"problem": "p", "answer": 0.5}, "0.5"),
    ({"problem": "p", "answer": "", "solution": "so \\boxed{0}"}, "0"),
    ({"problem": "p", "answer": None, "solution": "so \\boxed{0}"}, "0"),
    ({"question": "q", "answer": "steps\n#### 0"}, "0"),
    ({"question": "q", "answer": "steps\n#### 1,000"}, "1000"),
])
def test_a_zero_answer_is_an_answer(tmp_path, row, answer):
    f = write_jsonl(tmp_path / "x.jsonl", [row] * 2)
    train, held, bad = load(f)
    assert bad.count == 0 and train[0].answer == held[0].answer == answer
    assert train[0].messages[-1]["content"].endswith(f"\\boxed{{{answer}}}.") or "solution" in row


@pytest.mark.parametrize("row, reason", [
    ({"problem": "p", "solution": "so \\boxed{}"}, "MATH solution's \\boxed{} answer is empty"),
    ({"problem": "p", "answer": True}, "'answer' is a boolean, not text"),
    ({"problem": "p", "answer": float("nan")}, "'answer' is not a finite number"),
    ({"problem": ["p"], "answer": "1"}, "'problem' is a list, not text"),
    ({"question": "q", "answer": "steps\n####  \n"}, "GSM8K '#### N' line is empty"),
])
def test_values_that_are_not_text_are_bad_rows(tmp_path, row, reason):
    good = {"question": "q", "answer": "#### 1"} if "question" in row else {"problem": "p", "answer": "1"}
    f = write_jsonl(tmp_path / "x.jsonl", [good] * 30 + [row])
    train, held, bad = load(f, format="gsm8k" if "question" in row else "math")
    assert dict(bad.reasons) == {reason: 1} and len(train) + len(held) == 30


def test_a_malformed_first_row_does_not_decide_the_format(tmp_path):
    rows = [{"prompt": "p"}] + [{"prompt": f"p{i}", "completion": "c"} for i in range(30)]
    f = write_jsonl(tmp_path / "x.jsonl", rows)
    train, held, bad = load(f)
    assert dict(bad.reasons) == {"missing or empty 'completion'": 1} and len(train) + len(held) == 30


def test_numbers_keep_the_type_they_were_written_with(tmp_path):
    rows = [{"prompt": "1+0", "completion": 1}, {"prompt": "1.5+1", "completion": 2.5}]
    (tmp_path / "x.json").write_text(json.dumps(rows))
    for f in (write_jsonl(tmp_path / "x.jsonl", rows), tmp_path / "x.json"):
        train, held, _ = load(f)
        assert [ex.messages[-1]["content"] for ex in train + held] == ["1", "2.5"], f  # datasets made 1 into 1.0


def test_csv_fields_are_read_as_written(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text('prompt,completion\nzip of Paris?,007\nnull?,NA\n"a, b","multi\nline"\nx,y,extra\n'
                 + "".join(f"p{i},{i}\n" for i in range(30)))
    train, held, bad = load(f)
    got = {ex.messages[0]["content"]: ex.messages[1]["content"] for ex in train + held}
    assert got["zip of Paris?"] == "007" and got["null?"] == "NA" and got["a, b"] == "multi\nline"
    assert dict(bad.reasons) == {"CSV record has a different number of fields than the header": 1}
    assert bad.where(next(iter(bad.first.values()))) == f"row 3 of {f} (line 6)"


def test_parquet_and_saved_datasets_keep_zero_answers(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"problem": f"p{i}", "answer": i} for i in range(3)])
    ds.to_parquet(str(tmp_path / "x.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "x.parquet", tmp_path / "saved"):
        train, held, bad = load(path)
        assert bad.count == 0 and [ex.answer for ex in train + held] == ["0", "1", "2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: not a saved datasets directory"):
        load(tmp_path / "empty")


def test_too_few_usable_rows_is_one_line_with_the_counts(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [chat_row(0)])
    with pytest.raises(DataError, match=r"x\.jsonl: 1 usable row; at least 2 are needed"):
        load(f)
    write_jsonl(f, [chat_row(0), {"messages": []}, {"messages": []}])
    with pytest.raises(DataError, match=r"x\.jsonl: 1 usable row; at least 2"):
        load(f, max_bad_fraction=1.0)
    write_jsonl(f, [chat_row(0), chat_row(1)])
    train, held, _ = load(f, num_eval=50)
    assert len(train) == len(held) == 1
    e = write_jsonl(tmp_path / "eval.jsonl", [{"messages": []}])
    with pytest.raises(DataError, match=r"data\.eval_path: .*eval\.jsonl: no usable rows"):
        load(f, eval_path=str(e), max_bad_fraction=1.0)
    write_jsonl(e, [chat_row(2)])
    train, held, _ = load(tmp_path / "x.jsonl", eval_path=str(e))
    assert len(train) == 2 and len(held) == 1


def test_bad_rows_and_examples_point_back_to_their_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [chat_row(i) for i in range(10)])
    e = tmp_path / "eval.jsonl"
    e.write_text(json.dumps(chat_row(10)) + "\n\n" + json.dumps({"messages": []}) + "\n" + json.dumps({"messages": []}))
    with pytest.raises(DataError, match=r"first at row 1 of .*eval\.jsonl \(line 3\)\)$"):  # a blank line is no row
        load(f, eval_path=str(e))
    train, held, bad = load(f, eval_path=str(e), max_bad_fraction=0.5)
    assert [bad.where(ex.row) for ex in (train[3], held[0])] == [f"row 3 of {f} (line 4)", f"row 0 of {e} (line 1)"]


def test_read_rows_refuses_an_unreadable_line(tmp_path):
    from dspost.data.loading import read_rows

    f = write_jsonl(tmp_path / "x.jsonl", [{"a": 1}, {"a": 2}], tail='{"a": ')
    with pytest.raises(DataError, match=r"row 2 of .*x\.jsonl \(line 3\): not valid JSON"):
        read_rows(str(f))
