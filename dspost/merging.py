"""Task arithmetic (Ilharco et al., 2023, "Editing models with task arithmetic"): a model plus the task vectors of
its fine-tunes, `base + scale * sum_i (model_i - base)`. OPD's `opd.init: task_arithmetic` starts the student there:
RL specialists move few weights by little (the V4 pipeline's math specialist sits 0.002-0.01 nats per token from its
SFT start), so their summed updates keep most of each gain, and distillation then removes what they do to each other.

Written here rather than through mergekit: mergekit 0.1.5 knows no DeepseekV3 layout and infers one from
transformers' class, which lacks the MTP layers our checkpoints carry; the arithmetic itself is one line per tensor
over the models' own state dicts, ours or transformers'.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# config.json keys that say how a checkpoint was written, not what model it is
_WRITER_KEYS = ("transformers_version", "torch_dtype", "dtype", "_name_or_path")


class MergeError(ValueError):
    """Checkpoints that are not fine-tunes of one model; the message names the checkpoint and what differs."""


def _config(path: Path) -> dict:
    cfg = json.loads((Path(path) / "config.json").read_text())
    return {k: v for k, v in cfg.items() if k not in _WRITER_KEYS}


def task_arithmetic(base: str | Path, models: list[str | Path], scale: float, out: str | Path) -> Path:
    """`base + scale * sum_i (models[i] - base)` over every floating tensor (integer buffers stay the base's),
    written atomically to `out` with the base's tokenizer, in the base's format (ours, or transformers')."""
    from dspost.lora import is_ours, load_base
    from dspost.model import load_tokenizer
    from dspost.model.checkpoint import atomic_dir, write_checkpoint
    from dspost.training import check_finite, floating_tensors

    merged = load_base(base)
    target = merged.state_dict()
    start = {k: v.clone() for k, v in target.items()}
    base_cfg = _config(Path(base))
    for path in models:
        cfg = _config(Path(path))
        differ = sorted(k for k in base_cfg.keys() | cfg.keys() if base_cfg.get(k) != cfg.get(k))
        if differ:
            raise MergeError(f"{path}: not a fine-tune of {base} (config.json differs in {', '.join(differ[:5])})")
        tuned = load_base(path).state_dict()
        if tuned.keys() != start.keys():
            only = sorted(tuned.keys() ^ start.keys())[0]
            raise MergeError(f"{path}: not a fine-tune of {base} (tensor {only} is in one of them only)")
        seen: set[int] = set()  # a tensor the model holds under two names (tied embeddings) is added to once
        with torch.no_grad():
            for name, t in target.items():
                if t.is_floating_point() and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    t.add_(tuned[name].to(t.dtype) - start[name], alpha=scale)
    check_finite(0, "a merged weight", floating_tensors(merged))  # before anything is written
    out = Path(out)
    with atomic_dir(out) as tmp:
        tokenizer = load_tokenizer(str(base))
        if is_ours(merged):
            write_checkpoint(merged, tmp, tokenizer=tokenizer)
        else:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return out
