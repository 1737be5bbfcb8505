"""The model registry: what each network is and how it is trained and applied, in the spirit of timm's
``default_cfgs``. The engine, the training data and prediction read a model's :class:`Recipe` and hold no
``if name == ...``; a third model is one entry here, its module in ``models/`` and its augmentation
(``training/augment.py``'s ``RECIPES``).

The table is a leaf module (no torch, no network code): where the networks are is ``morphfuse.models.MODELS``,
so reading a recipe does not put a network's code into a stage's code hash (``hashing.py`` follows imports).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """One model of the registry.

    ``precomputed``: the feature members stored in ``precompute`` mode. ``optimizer``: ``adam`` or
    ``adamw`` (betas 0.9, 0.999; weight decay off for biases and norms). ``schedule``: ``step`` (StepLR,
    ``gamma`` every ``step_size`` epochs: the number of epochs does not shape it, so more epochs continue a run)
    or ``warmup_cosine`` (linear warm-up, cosine to ``min_lr`` over the whole run). ``mixup``: whether
    ``train.mixup`` applies. ``sample_keys``: training-sample keys beyond rgb, mask, label, has_mask and row.
    ``prediction``: ``faces`` (face scores averaged by the release's rule, the crops' maps pasted back into the
    image) or ``image`` (one full-image map, scored by ``mitl.score``). ``required_features``: feature members
    prediction needs beyond image_id and rgb. ``fold_for_inference``: prediction calls the network's
    ``fuse_for_inference()`` after ``eval()`` (MITL folds its AMW block's three convolutions into one).
    """

    name: str
    precomputed: tuple[str, ...]
    optimizer: str
    schedule: str
    mixup: bool
    sample_keys: tuple[str, ...]
    prediction: str
    required_features: tuple[str, ...] = ()
    fold_for_inference: bool = False


# Keys of a model's config block that configure the workflow, not the network (the one list of them): everything
# else in the block is a network option passed to the model's constructor.
WORKFLOW_KEYS = frozenset({"size", "train", "gpus", "threads", "paper"})
# Of those, the ones training does not read (the train rule's params leave them out, so changing them retrains
# nothing): the paper's settings (a reference) and the CPU threads of the job.
NOT_READ_BY_TRAINING = frozenset({"paper", "threads"})

RECIPES: dict[str, Recipe] = {
    # LFDL (LFDL.md; the IJCAI release's train config): two-stream Xception on face crops, Adam + StepLR, mixup.
    "lfdl": Recipe(name="lfdl", precomputed=("srm",), optimizer="adam", schedule="step",
                   mixup=True, sample_keys=("ref_box",), prediction="faces", required_features=("crop_box",)),
    # MITL (MITL.md; Mesorch's release): whole image, AdamW + warm-up cosine, no mixup.
    "mitl": Recipe(name="mitl", precomputed=("dct_high", "dct_low"), optimizer="adamw",
                   schedule="warmup_cosine", mixup=False, sample_keys=(), prediction="image", fold_for_inference=True),
}


def recipe(name: str) -> Recipe:
    """The registry entry of model ``name``; ``UserError`` naming the known ones otherwise."""
    if name not in RECIPES:
        from ..errors import UserError

        raise UserError(f"model {name!r} is unknown; expected one of {', '.join(RECIPES)}")
    return RECIPES[name]
