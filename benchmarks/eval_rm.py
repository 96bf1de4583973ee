"""Reward-model evaluation throughput: `dspost eval-rm`'s critic vs a plain transformers loop, side by side.

Same reward checkpoint (ours, saved in transformers' DeepseekV3ForSequenceClassification layout), same pairs,
same batch size and truncation, fp32 on the CPU. The plain loop is what one writes by hand with transformers:
`AutoModelForSequenceClassification`, pairs in file order, chosen and rejected of a batch padded together.
Ours is `SequenceClassifierCritic.compare` (our MoE with its grouped expert path, batches sorted by length).
The two alternate for `--repeats` rounds (so drift on the shared machine hits both) and the medians are kept;
both must agree on every pair's preference.

    python benchmarks/eval_rm.py --critic RM_DIR --data ../shared/data/hh_rlhf/harmless-base-test.jsonl.gz
"""

from __future__ import annotations

import argparse
import statistics
import time


def plain_transformers(path: str, pairs, batch_size: int, max_length: int) -> list[float]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dspost.rewards.critics import render

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    pad = model.config.pad_token_id
    margins = []
    with torch.inference_mode():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i: i + batch_size]
            seqs = [render(tok, p.prompt, r)[-max_length:] for p in chunk for r in (p.chosen, p.rejected)]
            ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, : len(s)] = torch.tensor(s)
            scores = model(input_ids=ids, attention_mask=(ids != pad).long()).logits[:, 0]
            margins += (scores[0::2] - scores[1::2]).tolist()
    return margins


def ours(path: str, pairs, batch_size: int, max_length: int) -> list[float]:
    from dspost.rewards.critics import SequenceClassifierCritic

    critic = SequenceClassifierCritic(path, batch_size=batch_size, max_length=max_length)
    return [j.score_chosen - j.score_rejected for j in critic.compare(pairs)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--critic", required=True, help="reward checkpoint directory (e.g. from recipes/rm_train.yaml)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from dspost.data.pairs import read_pairs

    torch.manual_seed(0)
    pairs = read_pairs(args.data)[0][: args.limit]
    print(f"{len(pairs)} pairs from {args.data}, batch {args.batch_size}, max length {args.max_length}, "
          f"{torch.get_num_threads()} threads")
    times: dict[str, list[float]] = {"transformers loop": [], "dspost eval-rm critic": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("transformers loop", plain_transformers), ("dspost eval-rm critic", ours)):
            t = time.perf_counter()
            results[name] = fn(args.critic, pairs, args.batch_size, args.max_length)
            times[name].append(time.perf_counter() - t)
    a, b = results["transformers loop"], results["dspost eval-rm critic"]
    same = sum((x > 0) == (y > 0) for x, y in zip(a, b))
    diff = max(abs(x - y) for x, y in zip(a, b))
    base = len(pairs) / statistics.median(times["transformers loop"])
    for name, ts in times.items():
        rate = len(pairs) / statistics.median(ts)
        print(f"  {name:<24} {rate:8.2f} pairs/s  {rate / base:5.2f}x   (median of {len(ts)}, load included)")
    print(f"  same preference on {same}/{len(pairs)} pairs; max |margin difference| {diff:.2e}")


if __name__ == "__main__":
    main()
