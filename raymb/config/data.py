"""[data] and [data.augment]: what is trained on, how it is read and how its rows are
augmented; frozen, keyword-only pydantic dataclasses like the other sections
(raymb.config.sections).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Interval
from pydantic.types import NonNegativeFloat, NonNegativeInt, PositiveFloat

from raymb.config.build import require, section
from raymb.errors import ConfigError


@section("data.augment")
class AugmentSection:
    """Augmentation of the training rows, in the collate on each worker. Each row's draws come
    from (train.seed, the epoch, the row's place in the epoch's order), so W workers x k
    microbatches still equal one process, and a resumed run the straight one. Validation,
    raymb eval and predict never augment."""

    hflip: Annotated[float, Interval(ge=0, le=1)] = 0.0
    """Images: the probability of flipping a row left to right."""
    crop_padding: NonNegativeInt = 0
    """Images: pad each side by this many pixels (data.augment.padding_mode), then crop a
    window of the original size at a random offset."""
    padding_mode: Literal["reflect", "zero"] = "reflect"
    """How crop_padding pads: reflect (the image mirrored at its edges; the padding must be
    smaller than the image) or zero (black)."""
    rotate_degrees: Annotated[float, Interval(ge=0, le=180)] = 0.0
    """Images: rotate by an angle drawn uniformly from [-rotate_degrees, rotate_degrees]
    (bilinear, the corners filled with 0)."""
    noise_std: NonNegativeFloat = 0.0
    """Add Gaussian noise of this standard deviation to every feature value, in the model's
    input units (after data.scale, data.mean and data.std): flat features or images."""

    @property
    def geometric(self) -> bool:
        """Whether an image transform (hflip, crop, rotation) is on."""
        return self.hflip > 0 or self.crop_padding > 0 or self.rotate_degrees > 0

    @property
    def enabled(self) -> bool:
        return self.geometric or self.noise_std > 0


@dataclass(frozen=True)
class Named:
    """data.inputs and data.targets: the columns the model reads and the ones the loss reads,
    each by name; `label` is the built-in losses' target (data.label)."""

    inputs: tuple[str, ...]
    targets: tuple[str, ...]
    label: str

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column read, each once: the inputs, then the targets."""
        return tuple(dict.fromkeys((*self.inputs, *self.targets)))


@section("data")
class DataSection:
    """The training and validation data (parquet) and how it is read."""

    train: str = "data/linear/train"
    """Parquet file, directory, glob or URI of the training set."""
    val: str | None = "data/linear/val"
    """Validation set, evaluated at each epoch's end; unset for none (and unset by default
    when data.train is set without it)."""
    features: str | list[str] = "features"
    """One list-of-numbers column, or a list of scalar columns."""
    label: str = "label"
    """Integer label: classification; float label: regression; a fixed-length list of 0/1
    (with loss.name = "bce"): multi-label."""
    inputs: list[str] | None = None
    """The columns the model reads, by name: it is called as model(**{column: tensor}) (a
    Hugging Face model: ["input_ids", "attention_mask"]). Any mix of scalar, fixed-length
    list and fixed-shape tensor columns; integers stay integers (int64), floats are float32.
    Unset: data.features, one tensor."""
    targets: list[str] | None = None
    """With data.inputs: the columns the loss and the metrics read, by name, as a dict of
    tensors (labels, weights, masks; a column may also be an input). Unset: [data.label]."""
    shuffle: Literal["rows", "files", "none"] = "rows"
    """Each epoch's row order, a pure function of (train.seed, epoch): rows: a fresh
    permutation of every row; files: the files in a fresh order, rows in file order (for data
    too large to cache); none: the same order every epoch."""
    cache: bool | Literal["auto"] = "auto"
    """Read the data once and serve every epoch from memory (exact, index-based order);
    false streams every epoch through Ray Data; auto: cache when it fits comfortably (a
    quarter of Ray's object store and of its memory)."""

    task: Literal["auto", "classify", "regress", "lm"] = "auto"
    """auto: classify for an integer label, regress for a floating one; lm: language
    modelling on a column of token blocks (input = block[:-1], target = block[1:], the loss a
    mean over tokens; data.label is not read). A prepared folder's manifest sets it."""
    scale: PositiveFloat | None = None
    """Multiply the feature values by this in the collate (e.g. 1/255 for uint8 images; a
    prepared image folder's manifest sets it)."""
    mean: list[float] | None = None
    """Per-channel mean subtracted after data.scale (channels first), with data.std."""
    std: list[float] | None = None
    """Per-channel standard deviation divided by after data.mean."""
    augment: AugmentSection = field(default_factory=AugmentSection)
    folds: NonNegativeInt = 0
    """k >= 2: k-fold cross-validation (`raymb tune` sets it): the rows of data.train whose
    position in a permutation drawn from train.seed is data.fold mod k validate, the others
    train (data.val must be unset; the rows are cached). 0: none."""
    fold: NonNegativeInt = 0
    """With data.folds: the fold held out, 0 to data.folds - 1."""

    @property
    def label_column(self) -> str | None:
        """The label column read, None for language modelling (the blocks are the target)."""
        return None if self.task == "lm" else self.label

    @property
    def named(self) -> Named | None:
        """With data.inputs: the columns by name (None: data.features, one tensor)."""
        if self.inputs is None:
            return None
        targets = [self.label] if self.targets is None else list(self.targets)
        return Named(tuple(self.inputs), tuple(targets), self.label)

    @property
    def reads(self) -> str | list[str] | Named:
        """What the workers read of a row: data.features (one tensor) or the named columns."""
        named = self.named
        return self.features if named is None else named

    def __post_init__(self) -> None:
        features, mean, std = self.features, self.mean, self.std
        require(features != [], "data.features", "a column name or a non-empty list", features)
        if (mean is None) != (std is None) or mean is not None and len(mean) != len(std):
            raise ConfigError(
                "data.mean and data.std must be set together, one value per channel each "
                f"(got mean={mean!r}, std={std!r})"
            )
        require(std is None or all(s > 0 for s in std), "data.std", "positive values", std)
        lm = 'one column of token blocks when data.task = "lm"'
        if self.inputs is not None or self.targets is not None:
            self._check_named()
        require(self.task != "lm" or isinstance(features, str), "data.features", lm, features)
        if self.folds or self.fold:
            folds, fold = self.folds, self.fold
            require(folds >= 2, "data.folds", ">= 2 when data.fold is set (or 0)", folds)
            require(fold < folds, "data.fold", f"< data.folds={folds}", fold)
            why = "with data.folds (the held-out rows validate)"
            require(self.val is None, "data.val", f'unset ("") {why}', self.val)
            require(self.cache is not False, "data.cache", 'true or "auto" with data.folds', False)
            files = '"rows" or "none" with data.folds (a fold is a set of rows)'
            require(self.shuffle != "files", "data.shuffle", files, self.shuffle)

    def _check_named(self) -> None:
        """data.inputs and data.targets: names, once each; no collate of data.features'."""
        inputs, targets = self.inputs, self.targets
        require(inputs is not None, "data.inputs", "set when data.targets is", inputs)
        for key, names in (("data.inputs", inputs), ("data.targets", targets)):
            if names is None:
                continue
            require(bool(names), key, "a non-empty list of column names", names)
            require(all(bool(n) for n in names), key, "non-empty column names", names)
            require(len(set(names)) == len(names), key, "column names without repeats", names)
        lm = '"auto", "classify" or "regress" with data.inputs (token blocks: data.features)'
        require(self.task != "lm", "data.task", lm, self.task)
        for key in ("scale", "mean"):
            why = "unset with data.inputs (the named columns reach the model as stored)"
            require(getattr(self, key) is None, f"data.{key}", why, getattr(self, key))
        if self.augment.enabled:
            raise ConfigError(
                "data.augment applies to data.features' images and features, not to data.inputs: "
                "unset data.augment or augment inside your model"
            )
