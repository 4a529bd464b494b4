"""The training run's configuration (`TrainConfig`: the recipe's defaults, see train/recipe.py) and
what a shard set's manifest says about the model that trains on it (its release, the model's input
and output channels). Read by the loop, the checkpoint schema, predict and export alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from shards.config import check_choices, from_known_fields
from shards.domain import REGIONS, RELEASES, Release
from shards.manifest import set_channels
from train import recipe
from train.model import Act, ModelName, Norm


@dataclass(frozen=True)
class TrainConfig:
    """Defaults: the field's 2D recipe (train/recipe.py); `recipe.SEED_RECIPE` is the seed's."""

    model: ModelName = "unet"
    base_channels: int = 32
    depth: int = 4
    norm: Norm = "instance"
    act: Act = "leaky"
    deep_supervision: bool = False  # nnU-Net: on; measured better off at our budgets (BENCHMARKS.md)
    targets: Literal["regions", "channels"] = "regions"  # regions: WT/TC/ET derived at train time
    loss: Literal["dice", "dice-bce"] = "dice-bce"
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 1e-2
    weight_decay: float = 3e-5
    schedule: Literal["poly", "cosine", "plateau"] = "poly"
    warmup_epochs: float = 0.0  # cosine: linear warm-up
    epochs: int = 10
    batch_size: int = 32
    num_workers: int = 2
    seed: int = 0
    fmt: Literal["", "zarr", "wds"] = ""  # "" = what the set holds (zarr preferred)
    augment: Literal["off", "light", "nnunet"] = "nnunet"  # light: the seed's flips/rotation in the loader
    fg_fraction: float = 1 / 3  # share of each batch with tumour (foreground oversampling)
    fg_balance: bool = False  # nnU-Net's sampling: that share always drawn, for a mask channel chosen evenly
    init: Literal["torch", "he"] = "torch"  # he: nnU-Net's He-normal weights, zero biases
    dice_smooth: float = 1.0  # the Dice loss's eps (nnU-Net: 1e-5)
    grad_clip: float = 0.0  # >0: clip the gradient norm at this (nnU-Net: 12); 0: off
    context: int = 0  # 2.5D: neighbouring slices on each side as extra channels
    folds: int = 0  # >1: cross-validation on the training split; `fold` is held out for validation
    fold: int = 0
    postprocess: bool = True  # choose ET->NCR and small-component thresholds on validation
    buffer_size: int = 1024
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    log_samples: bool = False
    max_batches: int = 0  # 0 = whole epoch; >0 caps batches per epoch (quick looks, tests)
    checkpoint_every: int = 500  # steps between mid-epoch checkpoints (last.pt with the loader position); 0: epochs only
    plane: Literal["axial", "coronal", "sagittal"] = "axial"  # the slices trained on (a set built with --planes)

    def __post_init__(self):
        check_choices(self)
        for name, least in (("epochs", 1), ("batch_size", 1), ("depth", 1), ("base_channels", 1), ("num_workers", 0),
                            ("context", 0), ("warmup_epochs", 0), ("checkpoint_every", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, not {getattr(self, name)}")
        if not (isinstance(self.grad_clip, (int, float)) and 0.0 <= self.grad_clip < float("inf")):
            raise ValueError(f"grad_clip must be a finite number >= 0, not {self.grad_clip!r}")
        if not (isinstance(self.dice_smooth, (int, float)) and 0.0 < self.dice_smooth < float("inf")):
            raise ValueError(f"dice_smooth must be a finite number > 0, not {self.dice_smooth!r}")
        if not 0.0 <= self.fg_fraction <= 1.0:
            raise ValueError(f"fg_fraction must lie in [0, 1], not {self.fg_fraction}")
        if self.folds == 1 or self.folds < 0 or (self.folds and not 0 <= self.fold < self.folds):
            raise ValueError(f"--folds must be 0 (off) or >= 2 and --fold in [0, folds), not {self.folds}, {self.fold}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A stored config; fields it lacks were written before they existed: the seed recipe's."""
        d = {**recipe.SEED_RECIPE, **d}
        if isinstance(d.get("augment"), bool):  # the old flag: the light loader augmentation
            d["augment"] = "light" if d["augment"] else "off"
        return from_known_fields(cls, d)

    @property
    def in_channels(self) -> int:
        """Input channels of a 4-modality set; `input_channels(M)` for any set."""
        return self.input_channels(4)

    def input_channels(self, n_modalities: int) -> int:
        """The model's input: the set's M modalities of the slice and of `context` neighbours each side."""
        return n_modalities * (2 * self.context + 1)


def release_of_set(config: dict) -> Release:
    """The release a shard set (its manifest's `config`) was built from: its sub-regions and
    regions are what training scores (sets from before the table grew are 2018-2023 glioma)."""
    return RELEASES.get(config.get("convention"), RELEASES["2020"])


def model_channels(config: dict, cfg: "TrainConfig") -> tuple[int, int]:
    """(in, out) channels of the model for a set's manifest `config`: M x (2 context + 1) inputs,
    one output per training target (the release's regions, or the set's own mask channels)."""
    mods, chans = set_channels({"config": config})
    rel = release_of_set(config)
    out = len(rel.regions) if cfg.targets == "regions" else len(chans)
    return cfg.input_channels(len(mods)), out


def chooses_postprocess(rel: Release) -> bool:
    """Post-processing (ET->NCR, small components) is defined on the glioma regions [WT, TC, ET]."""
    return tuple(rel.regions) == REGIONS


# --recipe: the named presets of the recipe fields (SEED_RECIPE's keys); the default recipe is
# TrainConfig's defaults
RECIPES = {"default": {}, "seed": recipe.SEED_RECIPE}
RECIPE_FIELDS = tuple(recipe.SEED_RECIPE)


def from_options(recipe_name: str, recipe_options: dict, **options) -> TrainConfig:
    """`train`'s config: the preset of `recipe_name`, each of `recipe_options` (RECIPE_FIELDS) given
    (not None) overriding it, and the `options` every recipe shares. ValueError for an unknown
    recipe or a bad value."""
    if recipe_name not in RECIPES:
        raise ValueError(f"--recipe must be {' or '.join(RECIPES)}, not {recipe_name!r}")
    chosen = {**RECIPES[recipe_name], **{k: v for k, v in recipe_options.items() if v is not None}}
    return TrainConfig(**options, **chosen)
