"""The data section: which images, how they are split, decoded and augmented. Which datasets exist, and
what each needs (a root, a streamed reader), is the data registry's to say (``kdray.resolve`` checks it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kdray.schema.fields import EPOCHS_MAX, SEED_MAX, AbsolutePath, Section, default_cache

EVAL_CROP_NEEDS_FOLDERS = (
    "augment.eval_crop crops image folders as they are decoded at data.image_size: set data.image_size "
    "and data.name=imagefolder, or leave eval_crop at 1.0"
)


class AugmentConfig(Section):
    in_weights = frozenset({"kind", "padding", "flip", "scale", "ratio", "crop_cycle", "eval_crop"})

    kind: Literal["crop_flip", "random_resized_crop"] = Field(
        "crop_flip",
        description="crop_flip: a random crop of the zero-padded image (CIFAR's); random_resized_crop: a random area "
        "and aspect ratio of the original image resized to data.image_size (ImageNet's; streamed folders only).",
    )
    padding: int = Field(4, ge=0, le=32, description="Zero padding before the random crop, pixels (0 = no crop).")
    flip: bool = Field(True, description="Random horizontal flip with probability 1/2.")
    scale: tuple[float, float] = Field(
        (0.08, 1.0), description="random_resized_crop: the range of the crop's share of the image's area."
    )
    ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="random_resized_crop: the range of the crop's aspect ratio (width / height)."
    )
    crop_cycle: int | None = Field(
        None,
        ge=1,
        le=EPOCHS_MAX,
        description="random_resized_crop: the crops repeat every this many epochs, so the guide-output cache can hold "
        "them (null: new crops every epoch, and guides run uncached).",
    )
    eval_crop: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Images are decoded by resizing the shorter side to data.image_size / eval_crop and keeping the "
        "centre square (evaluation's transform); default 1.0 for crop_flip, 0.875 for random_resized_crop.",
    )

    @model_validator(mode="before")
    @classmethod
    def _eval_crop_default(cls, data: Any) -> Any:
        """``eval_crop`` takes the kind's default here, so the resolved config records it."""
        if isinstance(data, dict) and data.get("eval_crop") is None:
            data = {**data, "eval_crop": 0.875 if data.get("kind") == "random_resized_crop" else 1.0}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> AugmentConfig:
        if self.kind == "random_resized_crop" and self.padding:
            raise ValueError("padding: random_resized_crop does not pad; set data.augment.padding=0")
        for name, (low, high) in (("scale", self.scale), ("ratio", self.ratio)):
            if not 0 < low <= high:
                raise ValueError(f"{name}: ({low}, {high}) must be 0 < low <= high")
        if self.scale[1] > 1:
            raise ValueError(f"scale: {self.scale[1]} is more than the whole image (1.0)")
        return self


class DataConfig(Section):
    # A trained model is keyed on the data's content (its fingerprint: every image's digest and label, the
    # classes) and on data.augment, not on these fields: two routes to the same images share their models.

    name: str = Field("digits", description="Dataset (see `kdray datasets`).")
    download: bool = Field(False, description="Let torchvision download CIFAR into data.root (needs internet).")
    root: str | None = Field(None, description="Folder or .tar.gz of the data (cifar*, imagefolder).")
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of train held out (stratified) when the data has no val split."
    )
    test_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Share of train held out (stratified, besides the validation split) as a test split when the data "
        "has none; null = no test split.",
    )
    split_seed: int = Field(
        0, ge=0, le=SEED_MAX, description="Seed of the validation and test splits and of limit_train's subset."
    )
    image_size: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="Resize every image to this square size when decoding (cached); null = as stored (image folders "
        "then need one size throughout).",
    )
    limit_train: int | None = Field(
        None, ge=10, le=10**10, description="Keep about this many training images (quick runs)."
    )
    cache_dir: AbsolutePath = Field(
        default_factory=default_cache, validate_default=True, description="Where decoded image folders are cached."
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="Training augmentation; defaults depend on the dataset."
    )
    loader: Literal["auto", "memory", "stream"] = Field(
        "auto",
        description="memory: decode every image once into memory (each worker holds all of it); stream: read the "
        "image files batch by batch on Ray Data (image folders only); auto: stream when the decoded images would "
        "not fit data.memory_budget.",
    )
    memory_budget: float | None = Field(
        None, gt=0, description="GiB the decoded images may take under data.loader=auto; null = half the available."
    )
    bad_images: Literal["refuse", "skip"] = Field(
        "refuse", description="An image file that cannot be decoded: refuse the data (naming it) or skip and count it."
    )
    decode_cpus: float = Field(1.0, gt=0, description="CPUs each Ray Data decoding task of a streamed split asks for.")

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.test_fraction is not None and self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"data.test_fraction: {self.test_fraction} with val_fraction {self.val_fraction} leaves no training "
                "images; keep their sum below 1"
            )
        if self.augment.kind == "random_resized_crop" and self.image_size is None:
            raise ValueError("augment.kind=random_resized_crop needs data.image_size, the training resolution")
        if self.augment.eval_crop != 1.0 and self.image_size is None:
            raise ValueError(EVAL_CROP_NEEDS_FOLDERS)
        return self
