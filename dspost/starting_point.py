"""Which checkpoint a stage starts from: a path, an earlier pipeline stage's output, or a built-in preset.

`tiny-math` is materialised once into the cache (`$DSPOST_CACHE`, default `~/.cache/dspost`): a random
init with the project's tokenizer, and the SFT warm start produced from it by `recipes/sft_tiny_math.yaml`
(keyed by that recipe's content, so editing the recipe makes a new warm start). `tiny-dense` (every layer dense)
is a random init only, with tiny-math's tokenizer files: a pipeline trains it with an SFT stage, and as an OPD
student it must share its teachers' tokenizer."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dspost.config import ModelSection, SFTRecipe

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
WARM_START_RECIPE = REPO_RECIPES / "sft_tiny_math.yaml"


def cache_dir() -> Path:
    return Path(os.environ.get("DSPOST_CACHE", Path.home() / ".cache" / "dspost"))


def _source_digest(*modules, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for m in modules:
        h.update(Path(m.__file__).read_bytes())
    return h.hexdigest()[:12]


def tiny_math_init() -> Path:
    """tiny-math's random init + tokenizer (see `preset_init`)."""
    return preset_init("tiny-math")


def preset_init(preset: str) -> Path:
    """A preset's random init + tokenizer, keyed by what determines them (the corpus generator, the tokenizer
    builder, the preset's config: adding a preset leaves the others' caches, and tiny-math's SFT warm start, valid).
    tiny-math's tokenizer is trained on the synthetic corpus; other presets copy it, so every preset shares one
    vocabulary (a distillation student must score its teachers' tokens)."""
    from dspost.data import synthetic_math
    from dspost.data.synthetic_math import corpus
    from dspost.model import DeepseekV3, PRESETS, build_tokenizer, load_tokenizer, tokenizer as tokenizer_mod

    args = PRESETS[preset]()
    path = cache_dir() / f"{preset}-init-{_source_digest(synthetic_math, tokenizer_mod, extra=repr(args))}"
    if (path / "config.json").is_file():
        return path

    if preset == "tiny-math":
        tokenizer = build_tokenizer(corpus(), args.vocab_size)
    else:
        tokenizer = load_tokenizer(str(tiny_math_init()))
    model = DeepseekV3(args).init_weights(seed=0)
    model.save_pretrained(path, tokenizer=tokenizer)
    return path


def warm_start() -> tuple[SFTRecipe, Path]:
    """The warm-start recipe (run into its cache directory, resuming) and the checkpoint it ends with. Only its
    last step's checkpoint is the warm start: a run killed after an earlier save resumes from that save."""
    from dspost.recipe import load_recipe

    if not WARM_START_RECIPE.is_file():
        raise FileNotFoundError(f"{WARM_START_RECIPE}: the warm-start recipe is missing (run from a dspost checkout)")
    init = tiny_math_init()
    digest = hashlib.sha256(WARM_START_RECIPE.read_bytes() + init.name.encode()).hexdigest()[:12]
    out = cache_dir() / f"tiny-math-sft-{digest}"
    recipe = load_recipe(WARM_START_RECIPE, [f"output_dir={out}", "resume=true"])
    return recipe, out / "checkpoints" / f"step_{recipe.trainer.max_steps}"


def starting_point(section: ModelSection, stage_outputs: dict[str, Path] | None = None) -> Path | None:
    """The checkpoint a stage's `model` section starts from; None for the tiny-math warm start when it is not
    trained yet (the runner trains it, see `warm_start`)."""
    if section.from_stage:
        return stage_outputs[section.from_stage]
    if section.path:
        return Path(section.path)
    if section.preset is None:
        raise ValueError("model: set model.path, model.preset or model.from_stage")
    if section.preset != "tiny-math":  # no SFT warm start: a pipeline trains it with an SFT stage
        return preset_init(section.preset)
    if not section.warm_start:
        return tiny_math_init()
    _, final = warm_start()
    return final if (final / "config.json").is_file() else None
