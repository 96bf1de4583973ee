"""Preference pairs (reward-model training, `eval-rm`): nothing lost or changed silently, as for examples.
A row that cannot be a pair is a counted bad row that points back to its file and line; a value is used as
written or not at all; too few usable pairs is one line."""

import gzip
import hashlib
import json

import pytest

from dspost.config import DataSection
from dspost.data.loading import DataError
from dspost.data.pairs import load_pairs, read_pairs


def write_jsonl(path, rows, tail: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def pair(i: int) -> dict:
    return {"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}


def load(path, **kw):
    return load_pairs(DataSection(path=str(path), **kw))


def test_a_file_with_one_pair_is_one_line_not_an_empty_training_set(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [pair(0)])
    with pytest.raises(DataError, match=r"x\.jsonl: 1 usable row; at least 2 are needed"):
        load(f)
    write_jsonl(f, [pair(0), pair(1)])
    train, held, _ = load(f, num_eval=50)
    assert [p.prompt for p in train] == ["p0"] and [p.prompt for p in held] == ["p1"]
    e = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "p", "chosen": "", "rejected": "r"}])
    with pytest.raises(DataError, match=r"data\.eval_path: .*eval\.jsonl: no usable rows"):
        load(f, eval_path=str(e), max_bad_fraction=1.0)


@pytest.mark.parametrize("gz", [False, True])
def test_a_torn_line_is_one_bad_row(tmp_path, gz):
    lines = [json.dumps(pair(i)) for i in range(20)]
    lines.insert(7, json.dumps(pair(99))[:20])  # cut off mid-string, as a killed writer leaves it
    data = ("\n".join(lines) + "\n").encode()
    f = tmp_path / ("x.jsonl.gz" if gz else "x.jsonl")
    f.write_bytes(gzip.compress(data) if gz else data)
    pairs, bad = read_pairs(str(f))
    assert dict(bad.reasons) == {"not valid JSON": 1} and bad.total == 21
    assert bad.where(bad.first["not valid JSON"]) == f"row 7 of {f} (line 8)"
    assert [p.prompt for p in pairs] == [f"p{i}" for i in range(20)]


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"},
     "'chosen' is a list, not text"),  # a chat-format pair file: not the repr of a list
    ({"prompt": {"text": "p"}, "chosen": "c", "rejected": "r"}, "'prompt' is an object, not text"),
    ({"prompt": "p", "chosen": "c", "rejected": False}, "'rejected' is a boolean, not text"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "answer": True}, "'answer' is a boolean, not text"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "category": ["a"]}, "'category' is a list, not text"),
    ({"prompt": "p", "chosen": None, "rejected": "r"}, "missing or empty 'chosen'"),
    ({"prompt": "p", "chosen": "c", "rejected": float("nan")}, "'rejected' is not a finite number"),
])
def test_values_that_are_not_text_are_bad_rows(tmp_path, row, reason):
    f = write_jsonl(tmp_path / "x.jsonl", [pair(i) for i in range(30)] + [row])
    pairs, bad = read_pairs(str(f))
    assert dict(bad.reasons) == {reason: 1} and len(pairs) == 30


def test_numbers_and_zeros_are_kept_as_written(tmp_path):
    rows = [{"prompt": "1+0", "chosen": 1, "rejected": 2.5, "answer": 0, "category": 0},
            {"prompt": "p", "chosen": "c", "rejected": "r", "answer": "", "category": None}]
    pairs, bad = read_pairs(str(write_jsonl(tmp_path / "x.jsonl", rows)))
    assert bad.count == 0
    assert [(p.chosen, p.rejected, p.answer, p.category) for p in pairs] == [("1", "2.5", "0", "0"),
                                                                             ("c", "r", None, None)]


def test_a_malformed_first_row_does_not_decide_the_format(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "chosen": "c"}] + [pair(i) for i in range(30)])
    f.write_text('{"prompt": "p", "chos\n' + f.read_text())
    pairs, bad = read_pairs(str(f))
    assert dict(bad.reasons) == {"not valid JSON": 1, "missing or empty 'rejected'": 1} and len(pairs) == 30
    write_jsonl(f, [{"foo": 1}] * 2)
    with pytest.raises(DataError, match=r"cannot infer a preference-pair format from columns \['foo'\]"):
        read_pairs(str(f))


def llmbar(label, i: int = 0) -> dict:
    return {"input": f"q{i}", "output_1": "one", "output_2": "two", "label": label}


@pytest.mark.parametrize("label, chosen", [(1, "one"), (2, "two"), ("1", "one"), ("2", "two")])
def test_llmbar_labels_pick_the_chosen_output(tmp_path, label, chosen):
    f = write_jsonl(tmp_path / "x.jsonl", [llmbar(label)])
    (p,), bad = read_pairs(str(f))
    assert bad.count == 0 and (p.prompt, p.chosen, p.rejected) == ("q0", chosen, {"one": "two", "two": "one"}[chosen])


@pytest.mark.parametrize("label, reason", [
    (0, "'label' is not 1 or 2"), (3, "'label' is not 1 or 2"), ("one", "'label' is not 1 or 2"),
    (1.0, "'label' is not 1 or 2"), (" 1", "'label' is not 1 or 2"), (True, "'label' is a boolean, not text"),
    (None, "missing or empty 'label'"), ("", "missing or empty 'label'"), ([1], "'label' is a list, not text"),
])
def test_other_llmbar_labels_are_bad_rows(tmp_path, label, reason):
    f = write_jsonl(tmp_path / "x.jsonl", [llmbar(1, i) for i in range(30)] + [llmbar(label)])
    pairs, bad = read_pairs(str(f))
    assert dict(bad.reasons) == {reason: 1} and len(pairs) == 30


def test_llmbar_csv_labels_are_text(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text('input,output_1,output_2,label\nq,"a, b",NA,2\nq,x,y,1\nq,x,y,1.0\n')
    pairs, bad = read_pairs(str(f))
    assert [(p.chosen, p.rejected) for p in pairs] == [("NA", "a, b"), ("x", "y")]
    assert dict(bad.reasons) == {"'label' is not 1 or 2": 1} and bad.where(bad.first["'label' is not 1 or 2"]) == \
        f"row 2 of {f} (line 4)"


HISTORY = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: q"


def hh(chosen_reply: str, rejected_reply: str) -> dict:
    return {"chosen": f"{HISTORY}\n\nAssistant: {chosen_reply}",
            "rejected": f"{HISTORY}\n\nAssistant: {rejected_reply}"}


def test_hh_rlhf_transcripts_split_into_history_and_last_replies(tmp_path):
    rows = [hh("good", "bad"),
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other q\n\nAssistant: b"},
            hh("good", "  "), {"chosen": "\n\nHuman: q", "rejected": "\n\nHuman: q"}]
    pairs, bad = read_pairs(str(write_jsonl(tmp_path / "x.jsonl", rows)), "hh_rlhf")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Human: hi\n\nAssistant: hello\n\nHuman: q", "good", "bad")]
    assert dict(bad.reasons) == {"chosen and rejected transcripts differ before the last reply": 1,
                                 "empty final reply": 1, "transcript has no 'Assistant:' turn": 1}
    assert bad.first == {"chosen and rejected transcripts differ before the last reply": 1, "empty final reply": 2,
                         "transcript has no 'Assistant:' turn": 3}


def test_eval_rows_are_numbered_after_every_row_of_the_training_file(tmp_path):
    rows = [pair(i) for i in range(10)]
    rows[2] = rows[5] = {"prompt": "p", "chosen": "", "rejected": "r"}
    f = write_jsonl(tmp_path / "x.jsonl", rows)
    e = tmp_path / "eval.jsonl"
    e.write_text(json.dumps(pair(10)) + "\n\n" + json.dumps({"prompt": "p", "chosen": "c", "rejected": [1]}) + "\n")
    train, held, bad = load(f, eval_path=str(e), max_bad_fraction=0.5)
    assert bad.total == 12 and bad.first == {"missing or empty 'chosen'": 2, "'rejected' is a list, not text": 11}
    assert bad.where(11) == f"row 1 of {e} (line 3)"  # a blank line is no row
    assert [bad.where(p.row) for p in (train[2], held[0])] == [f"row 3 of {f} (line 4)", f"row 0 of {e} (line 1)"]
    with pytest.raises(DataError, match=r"3/12 rows are bad .* first at row 2 of .*x\.jsonl \(line 3\)\)$"):
        load(f, eval_path=str(e))


def test_synthetic_pairs_are_numbered_train_then_held_out():
    train, held, bad = load_pairs(DataSection(num_train=20, num_eval=5, difficulty=[1]))
    assert [p.row for p in train + held] == list(range(bad.total)) and bad.total == 25


def digest(pairs) -> str:
    return hashlib.sha256(json.dumps([[p.prompt, p.chosen, p.rejected, p.category, p.answer]
                                      for p in pairs]).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name, n, bad_reasons, sha", [
    # The digests are of the pairs 775a309's loader read from these files: the rewrite changes none of them.
    ("llmbar/Natural.json", 100, {}, "864d923cd14574f4"),
    ("hh_rlhf/harmless-base-test.jsonl.gz", 2303,
     {"empty final reply": 4, "chosen and rejected transcripts differ before the last reply": 5}, "ef24c0004126d399"),
])
def test_shared_preference_sets_load_as_before(data_dir, name, n, bad_reasons, sha):
    pairs, bad = read_pairs(str(data_dir / name))
    assert len(pairs) == n and dict(bad.reasons) == bad_reasons and bad.total == n + bad.count
    assert digest(pairs) == sha
