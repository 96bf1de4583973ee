"""Several named data sources mixed by weight: each step's batch takes each source's share, from its own stream,
as a pure function of (seed, step); one source is exactly the single-source order; rows carry their domain."""

import json
from collections import Counter

import pytest

from dspost.config import DataSection
from dspost.data.loading import DataError
from dspost.data.packing import batch_indices
from dspost.data.sources import Mixture, load_mixture


def test_shares_follow_the_weights_and_fill_the_batch():
    m = Mixture({"a": list(range(10)), "b": list(range(20)), "c": list(range(5))}, {"a": 1.0, "b": 2.0, "c": 1.0})
    assert m.shares(16) == {"a": 4, "b": 8, "c": 4}
    assert m.shares(7) == {"a": 2, "b": 3, "c": 2}  # 1.75, 3.5, 1.75: the remainder to the largest fractions
    assert sum(m.shares(13).values()) == 13
    with pytest.raises(DataError, match="gives source 'a' no item"):
        Mixture({"a": [0], "b": [0]}, {"a": 1.0, "b": 100.0}).shares(4)


def test_a_batch_takes_each_sources_share_from_its_own_part_and_repeats_per_step():
    m = Mixture({"a": [f"a{i}" for i in range(10)], "b": [f"b{i}" for i in range(20)]}, {"a": 1.0, "b": 3.0})
    items = m.items
    for step in range(5):
        idx = m.batch(8, step, seed=3)
        assert idx == m.batch(8, step, seed=3)  # a function of (seed, step)
        assert Counter(items[i][0] for i in idx) == {"a": 2, "b": 6}
    seen = {items[i] for step in range(5) for i in m.batch(8, step, seed=3) if items[i][0] == "a"}
    assert seen == {f"a{i}" for i in range(10)}  # epoch-wise: every item of a source in its turn


def test_one_source_is_exactly_the_single_source_order():
    m = Mixture({None: list(range(37))}, {None: 1.0})
    assert all(m.batch(8, step, 5) == batch_indices(37, 8, step, 5) for step in range(6))


def test_sources_load_with_their_domain_and_own_held_out_split(tmp_path):
    rows = [{"question": f"What is {i} + 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"} for i in range(30)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataSection(sources=[{"name": "math", "synthetic": "math", "num_train": 20, "num_eval": 5},
                                {"name": "gsm", "path": str(tmp_path / "g.jsonl"), "weight": 2}])
    train, held_out, bad = load_mixture(data)
    assert train.domains == ["math", "gsm"] and train.weights == {"math": 1.0, "gsm": 2.0}
    assert len(train.parts["math"]) == 20 and len(held_out.parts["math"]) == 5
    assert len(train.parts["gsm"]) == 27 and len(held_out.parts["gsm"]) == 3  # 10% of the file held out
    assert {ex.domain for ex in train.parts["gsm"]} == {"gsm"} and {ex.domain for ex in held_out.items} == {"math", "gsm"}
    assert set(bad) == {"math", "gsm"}
    single, _, _ = load_mixture(DataSection(num_train=20, num_eval=5))
    assert single.domains == [None] and {ex.domain for ex in single.items} == {None}


def test_a_synthetic_instruction_source_carries_its_constraints():
    data = DataSection(sources=[{"name": "math", "synthetic": "math", "num_train": 8, "num_eval": 2},
                                {"name": "if", "synthetic": "instruct", "num_train": 8, "num_eval": 2}])
    train, held_out, _ = load_mixture(data)
    assert [len(p) for p in train.parts.values()] == [8, 8] and [len(p) for p in held_out.parts.values()] == [2, 2]
    assert all(ex.extra["instruction_id_list"] and ex.domain == "if" for ex in train.parts["if"])
    assert not any("instruction_id_list" in ex.extra for ex in train.parts["math"])
