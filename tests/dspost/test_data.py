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
    f.write_text(json.dumps({"q": "1+1?", "a": "#### 2"}) + "\n")
    train, held, _ = load_examples(DataSection(path=str(f), format="gsm8k", columns={"question": "q", "answer": "a"},
                                               num_eval=1))
    assert held[0].answer == "2"
    f.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(DataError, match="cannot infer the format"):
        load_examples(DataSection(path=str(f)))
