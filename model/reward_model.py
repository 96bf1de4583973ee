"""DeepSeek-V3 with a scalar head: a Bradley-Terry reward model in the layout of transformers'
`DeepseekV3ForSequenceClassification` (num_labels 1), so `AutoModelForSequenceClassification` loads what
we save.

The head reads the final-normed hidden state of each sequence's last non-padding token, as transformers
does. The checkpoint keeps the language-model head too (transformers ignores it), so the same directory
also loads as a causal LM, e.g. to start the reward model from an SFT checkpoint and back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from dspost.model.checkpoint import CheckpointError, atomic_dir, from_pretrained, write_checkpoint
from dspost.model.deepseek_v3 import DeepseekV3

HEAD = "score.weight"
ARCHITECTURE = "DeepseekV3ForSequenceClassification"


class DeepseekV3RewardModel(nn.Module):
    def __init__(self, lm: DeepseekV3):
        super().__init__()
        if lm.args.num_nextn_predict_layers:  # a sequence score has no next tokens to predict
            lm.model.mtp_layers = nn.ModuleList()
            lm.args = lm.args.replace(num_nextn_predict_layers=0, mtp_offsets=None)
        self.lm = lm
        self.score = nn.Linear(lm.args.hidden_size, 1, bias=False, dtype=lm.lm_head.weight.dtype,
                               device=lm.lm_head.weight.device)

    @property
    def args(self):
        return self.lm.args

    def forward(self, input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
        """Scores [B] of right- or left-padded sequences [B, S]."""
        h, *_ = self.lm.trunk(input_ids)
        B, S = input_ids.shape
        # The last position that is not padding (transformers' rule for sequence classification).
        positions = torch.arange(S, device=input_ids.device).expand(B, S)
        last = torch.where(input_ids != pad_token_id, positions, -1).max(-1).values.clamp(min=0)
        h_last = h[torch.arange(B, device=input_ids.device), last]
        return self.score(self.lm.model.norm(h_last)).squeeze(-1).float()

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None) -> Path:
        with atomic_dir(path) as tmp:
            self.write(tmp, tokenizer)
        return Path(path)

    def write(self, out: Path, tokenizer=None) -> None:
        """Write into an existing directory (callers wrap it in `atomic_dir`)."""
        write_checkpoint(self.lm, out, tokenizer=tokenizer)
        _add_head(out, self.score.weight.detach().contiguous().cpu())
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(architectures=[ARCHITECTURE], num_labels=1, id2label={"0": "LABEL_0"},
                   label2id={"LABEL_0": 0}, pad_token_id=self.lm.args.pad_token_id)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))


def _add_head(out: Path, weight: torch.Tensor) -> None:
    """transformers reads a lone `model.safetensors` without looking for other files, and an index when
    sharded: put the head where it will look."""
    from safetensors.torch import load_file, save_file

    index = out / "model.safetensors.index.json"
    if index.is_file():
        save_file({HEAD: weight}, str(out / "score.safetensors"), metadata={"format": "pt"})
        data = json.loads(index.read_text())
        data["weight_map"][HEAD] = "score.safetensors"
        index.write_text(json.dumps(data, indent=2))
        return
    tensors = load_file(str(out / "model.safetensors"))
    tensors[HEAD] = weight
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def is_reward_checkpoint(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and ARCHITECTURE in (json.loads(cfg.read_text()).get("architectures") or [])


def load_reward_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
                      init_head_seed: int | None = None) -> DeepseekV3RewardModel:
    """A reward checkpoint, or a causal-LM checkpoint with a fresh head (`init_head_seed`) to train from."""
    path = Path(path)
    rm = DeepseekV3RewardModel(from_pretrained(path, dtype=dtype))
    w = _read_head(path)
    if w is not None:
        if tuple(w.shape) != tuple(rm.score.weight.shape):
            raise CheckpointError(f"{path}: {HEAD} has shape {tuple(w.shape)}, expected {tuple(rm.score.weight.shape)}")
        with torch.no_grad():
            rm.score.weight.copy_(w)
    elif init_head_seed is None:
        raise CheckpointError(f"{path}: not a reward model (no {HEAD}); train one with a `kind: rm` recipe")
    else:
        gen = torch.Generator().manual_seed(init_head_seed)
        with torch.no_grad():
            rm.score.weight.copy_(torch.randn(rm.score.weight.shape, generator=gen) * rm.args.initializer_range)
    return rm.eval()


def _read_head(path: Path) -> torch.Tensor | None:
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            if HEAD in sf.keys():
                return sf.get_tensor(HEAD)
    return None
