"""Experiment configuration: one YAML file, validated into frozen pydantic sections.

Validation happens on the driver before any model, Ray or MLflow work starts, so a typo costs a
second, not a queued GPU job. Each method declares its own parameter model next to its code
(``kdray.methods``); this module only assembles them. Nothing ever writes back into a config.

The registries of datasets, models and methods are filled by their packages, which import this
module for their own settings: this module reaches them only while validating (``_registry``),
never at import, so there is no import circle and ``import kdray.config`` costs no torch. Every path
field is made absolute here, once: a validated config means the same files from any working folder
(Tune trials and Ray Train workers run in their own).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from kdray.registry import Registry

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_METHOD = "kd"  # what `method:` means without a name


class ConfigError(ValueError):
    """A bad experiment file or override; the message is one line naming the field and the fix."""


class NestedConfigError(ValueError):
    """A section validated by hand inside a validator (a method's parameters): its own errors, kept whole
    so the one-line message can name the nested field."""

    def __init__(self, error: ValidationError) -> None:
        super().__init__(str(error))
        self.error = error


def _registry(kind: str) -> Registry[Any]:
    """The registry of ``kind``, imported on first use (see the module docstring)."""
    if kind == "method":
        from kdray.methods import METHODS, load_installed

        load_installed()  # packages installed since kdray.methods was imported
        return METHODS
    if kind == "model":
        from kdray.models import MODELS

        return MODELS
    from kdray.data import DATASETS

    return DATASETS


def _known(kind: str) -> AfterValidator:
    """A validator that accepts registered names of ``kind`` (and lists the choices otherwise)."""
    return AfterValidator(lambda name: _registry(kind).require(name))


def _model_name(name: str) -> str:
    """A model name: kdray's, ``torchvision.<name>``, ``timm.<name>``, ``package.module:callable`` or an entry point."""
    from kdray.models import require_model

    return require_model(name)


ModelName = Annotated[str, AfterValidator(_model_name)]


def weights_source(weights: str) -> str:
    """Given weights: an MLflow model URI or ``pretrained[:TAG]`` as written, a local file made absolute."""
    if weights.startswith(("runs:/", "models:/", "pretrained")) or "://" in weights:
        return weights
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(f"'{weights}' is not a file; give a state-dict file, an MLflow model URI or pretrained")
    return str(path.resolve())


def absolute_path(path: str) -> str:
    """A local path made absolute (``~`` expanded); URLs (``s3://...``) as given."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


AbsolutePath = Annotated[str, AfterValidator(absolute_path)]

# Upper bounds of the integer fields, so a typo is one line here, not an overflow deep in numpy or torch.
SEED_MAX = 2**32 - 1  # numpy's seeds end here (torch's go further)
EPOCHS_MAX = 100_000
BATCH_MAX = 1 << 20  # images in one step of one worker
WORKERS_MAX = 4096  # Ray Train workers, threads, concurrent trials


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MethodParams(BaseModel):
    """Base of every method's hyperparameters (each method defines its own next to its code); ``name``
    selects the method."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str

    # Fields added after models were stored, each with the default that computes what the method computed
    # before it existed: left out of a stage's identity at that default, so stored models keep their keys.
    added_later: ClassVar[dict[str, Any]] = {}

    def identity(self) -> dict[str, Any]:
        """What of these parameters determines the trained weights (part of a stage's store key)."""
        dumped = self.model_dump(mode="json")
        return {k: v for k, v in dumped.items() if k not in self.added_later or v != self.added_later[k]}


def method_params(value: Any) -> MethodParams:
    """``{"name": ..., fields}`` (name defaults to kd) as that method's own parameter model."""
    if isinstance(value, MethodParams):
        return value
    if not isinstance(value, dict):
        raise ValueError("method: a mapping such as {name: kd, temperature: 4}")
    methods = _registry("method")
    name = value.get("name", DEFAULT_METHOD)
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(methods.names())}")
    try:
        return methods[name].Params.model_validate({**value, "name": name})
    except ValidationError as error:
        raise NestedConfigError(error) from None


def default_tracking_uri() -> str:
    """Where runs go unless a config or command says otherwise: $MLFLOW_TRACKING_URI, else ./mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def default_store_path() -> str:
    """The model store unless set: $KDRAY_STORE_PATH, else .kdray/store."""
    return os.environ.get("KDRAY_STORE_PATH") or ".kdray/store"


def default_storage_path() -> str:
    """Ray run storage unless set: $KDRAY_STORAGE_PATH (a cluster sets it), else .kdray/ray."""
    return os.environ.get("KDRAY_STORAGE_PATH") or ".kdray/ray"


def _default_cache() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "kdray")


class AugmentConfig(Section):
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
    name: Annotated[str, _known("dataset")] = Field("digits", description="Dataset (see `kdray datasets`).")
    download: bool = Field(False, description="Let torchvision download CIFAR into data.root (needs internet).")
    root: str | None = Field(
        None, validate_default=True, description="Folder or .tar.gz of the data (cifar*, imagefolder)."
    )
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
        default_factory=_default_cache, validate_default=True, description="Where decoded image folders are cached."
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

    @model_validator(mode="before")
    @classmethod
    def _dataset_augment_defaults(cls, data: Any) -> Any:
        """Fill augmentation defaults from the dataset (no flip for digits) where the file leaves them."""
        datasets = _registry("dataset")
        if isinstance(data, dict) and data.get("name", "digits") in datasets:
            spec = datasets[data.get("name", "digits")]
            augment = dict(data.get("augment") or {})
            resized = augment.get("kind") == "random_resized_crop"
            augment.setdefault("padding", 0 if resized else spec.padding)
            augment.setdefault("flip", spec.flip)
            data = {**data, "augment": augment}
        return data

    @model_validator(mode="after")
    def _loader_fits_dataset(self) -> DataConfig:
        if self.test_fraction is not None and self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"data.test_fraction: {self.test_fraction} with val_fraction {self.val_fraction} leaves no training "
                "images; keep their sum below 1"
            )
        streams = _registry("dataset")[self.name].stream is not None
        if self.loader == "stream" and not streams:
            raise ValueError(
                f"data.loader=stream reads image folders (data.name=imagefolder) and '{self.name}' is read whole; "
                "set data.loader=memory or auto"
            )
        if self.augment.kind == "random_resized_crop":
            if not streams or self.loader == "memory":
                raise ValueError(
                    "augment.kind=random_resized_crop crops the original images, which only a streamed image folder "
                    "reads: use data.name=imagefolder with data.loader=stream or auto"
                )
            if self.image_size is None:
                raise ValueError("augment.kind=random_resized_crop needs data.image_size, the training resolution")
        if self.augment.eval_crop != 1.0 and (self.image_size is None or not streams):
            raise ValueError(
                "augment.eval_crop crops image folders as they are decoded at data.image_size: set data.image_size "
                "and data.name=imagefolder, or leave eval_crop at 1.0"
            )
        return self

    @field_validator("root")
    @classmethod
    def _root_exists(cls, root: str | None, info: ValidationInfo) -> str | None:
        name = info.data.get("name")
        if name is None:
            return root
        spec = _registry("dataset")[name]
        if root is None:
            if spec.needs_root:
                raise ValueError(f"dataset '{name}' needs data.root (a folder or .tar.gz path)")
            return root
        if "://" in root:
            raise ValueError(
                f"'{root}': kdray reads data through the file system; mount the bucket at the same path on every node "
                "(e.g. mountpoint-s3 or gcsfuse) and give that path"
            )
        path = Path(root).expanduser()
        if not path.exists() and not (info.data.get("download") and spec.needs_root):
            raise ValueError(f"'{root}' does not exist; give the path of the {name} data")
        problem = spec.check_root(path, bool(info.data.get("download")))
        if problem:
            raise ValueError(problem)
        return str(path.resolve()) if path.exists() else root


class ModelConfig(Section):
    name: ModelName = Field(
        "resnet8",
        description="Architecture: a name from `kdray models`, torchvision.<name>, timm.<name>, or "
        "package.module:callable (a function or class returning a torch.nn.Module).",
    )
    onthefly: bool = Field(False, description="Replace every 3x3 convolution by a 1x3 one (Pacemaker's student).")
    batchnorm: bool = Field(True, description="BatchNorm layers (false: none, e.g. to compare worker counts).")


class TeacherConfig(ModelConfig):
    name: ModelName = Field("resnet20", description="Teacher architecture (as student.name).")
    epochs: int | None = Field(None, ge=1, le=EPOCHS_MAX, description="Teacher training epochs; null = train.epochs.")
    lr: float | None = Field(None, gt=0, description="Teacher peak learning rate; null = train.lr.")
    seed: int | None = Field(
        None,
        ge=0,
        le=SEED_MAX,
        description="Teacher training seed; null = train.seed. Fix it to share one teacher among student seeds.",
    )
    weights: str | None = Field(
        None,
        description="A trained teacher, never retrained: a state-dict file (torch.save(model.state_dict())), an "
        "MLflow model URI (runs:/..., models:/NAME/VERSION), or pretrained[:TAG] for torchvision/timm models.",
    )
    input_mean: list[float] | None = Field(
        None,
        description="Per-channel mean (0..1 scale) the given weights expect (null: the data's; pretrained: theirs).",
    )
    input_std: list[float] | None = Field(None, description="Per-channel std the given weights expect (as input_mean).")

    @field_validator("weights")
    @classmethod
    def _weights_source(cls, weights: str | None) -> str | None:
        return None if weights is None else weights_source(weights)

    @model_validator(mode="after")
    def _stats_together(self) -> TeacherConfig:
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("teacher.input_mean and teacher.input_std: give both or neither")
        if self.input_mean is not None and self.weights is None:
            raise ValueError("teacher.input_mean: only a given teacher (teacher.weights) has its own normalisation")
        return self


class AssistantsConfig(Section):
    depth: int = Field(0, ge=0, le=8, description="Teacher assistants between teacher and student (takd, dgkd).")
    models: list[ModelName] = Field(
        default_factory=list, description="Ladder to pick assistants from, largest first (default: the built-in one)."
    )
    weights: dict[str, Annotated[str, AfterValidator(weights_source)]] = Field(
        default_factory=dict,
        description="Assistants given already trained, by architecture: {resnet56: path or MLflow URI}; each is "
        "evaluated and stored, never trained (its inputs standardised with the data's statistics).",
    )


class TrainConfig(Section):
    epochs: int = Field(10, ge=1, le=EPOCHS_MAX, description="Training epochs of the student (and teacher unless set).")
    batch_size: int = Field(128, ge=2, le=BATCH_MAX, description="Images per step on each worker.")
    eval_batch_size: int = Field(1024, ge=1, le=BATCH_MAX, description="Images per evaluation step.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD (momentum) or AdamW.")
    lr: float = Field(0.05, gt=0, description="Peak learning rate (per worker batch; see lr_scaling).")
    lr_scaling: Literal["none", "linear"] = Field(
        "none",
        description="linear: multiply lr by the number of workers (Goyal et al. 2017), as the global batch grows.",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (AdamW: beta1).")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD).")
    weight_decay: float = Field(5e-4, ge=0, description="Weight decay.")
    schedule: Literal["constant", "step", "multistep", "cosine"] = Field("cosine", description="LR schedule.")
    step_size: int = Field(30, ge=1, le=EPOCHS_MAX, description="Epochs between decays for schedule=step.")
    milestones: list[int] = Field(default_factory=list, description="Epochs of decay for schedule=multistep.")
    gamma: float = Field(0.1, gt=0, le=1, description="Decay factor of step/multistep.")
    warmup_epochs: int = Field(0, ge=0, le=EPOCHS_MAX, description="Linear warm-up epochs before the schedule.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of initialisation, batch order and augmentation.")
    amp: bool = Field(True, description="Mixed precision on GPU (bf16 where supported, else fp16); no-op on CPU.")
    channels_last: bool = Field(True, description="NHWC memory layout on GPU (faster convolutions); no-op on CPU.")
    compile: bool = Field(False, description="torch.compile the student and guides (slow first epoch, faster later).")
    test_each_epoch: bool = Field(
        False,
        description="Evaluate the test split after every epoch too (test/* per epoch), so a report can give the test "
        "accuracy at the best-on-validation epoch. Select on val/*, never on test/*.",
    )

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainConfig:
        if self.schedule == "multistep":
            if not self.milestones:
                raise ValueError("schedule=multistep needs train.milestones, e.g. [150, 180, 210]")
            if sorted(self.milestones) != self.milestones or self.milestones[-1] >= self.epochs:
                raise ValueError(f"train.milestones must increase and stay below train.epochs={self.epochs}")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"train.warmup_epochs must be below train.epochs={self.epochs}")
        return self


class ScalingConfig(Section):
    num_workers: int = Field(
        0, ge=0, le=WORKERS_MAX, description="0 = train in this process; N >= 1 = N Ray Train workers (DDP)."
    )
    use_gpu: bool | None = Field(None, description="null = use GPUs when the machine (or Ray cluster) has them.")
    threads: int | None = Field(
        None, ge=1, le=WORKERS_MAX, description="CPU threads for torch (null = torch's default)."
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Ray resources per worker, e.g. {CPU: 4, GPU: 1}."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray placement of the workers: PACK fills a node first, SPREAD puts them on different nodes.",
    )
    parallelism: Literal["data", "branches"] = Field(
        "data",
        description="data: DDP, each worker trains on its shard; branches: online ensembles (online_branch, dml) "
        "with one branch per worker, all workers on the same batches (num_workers = number of branches).",
    )
    sync_batchnorm: bool = Field(
        False, description="Data parallelism on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)."
    )
    checkpoint_every: int = Field(1, ge=1, le=EPOCHS_MAX, description="Checkpoint the training state every K epochs.")
    keep_checkpoints: int = Field(
        2, ge=1, le=1000, description="Ray checkpoints kept per stage or trial (the newest; older ones are deleted)."
    )
    max_failures: int = Field(
        0,
        ge=0,
        le=1000,
        description="Ray runs: restart from the last checkpoint up to N times (bad input is never retried).",
    )
    storage_path: AbsolutePath = Field(
        default_factory=default_storage_path,
        validate_default=True,
        description="Ray Train/Tune run storage (checkpoints, search state; default: $KDRAY_STORAGE_PATH, else "
        ".kdray/ray); shared storage (s3://, NFS) on several nodes.",
    )

    @property
    def data_shards(self) -> int:
        """How many workers split each epoch's images: every worker under data parallelism, one under branch
        parallelism (every worker reads every batch)."""
        return max(1, self.num_workers) if self.parallelism == "data" else 1


NAME_LIMIT = 100


def plain_name(name: str) -> str:
    """A name kdray may turn into a folder (a search's) or show as a run or experiment: 1-100 printable
    characters, no path separator and no '..', so no folder derived from it can leave its root."""
    if not name.strip():
        raise ValueError("an empty name; give one")
    if len(name) > NAME_LIMIT:
        raise ValueError(f"{len(name)} characters long; keep it to {NAME_LIMIT}")
    if "/" in name or "\\" in name or ".." in name or not name.isprintable():
        raise ValueError(f"{name!r} is not a plain name: no '/', '\\', '..' or control characters")
    return name


PlainName = Annotated[str, AfterValidator(plain_name)]


def absolute_uri(uri: str) -> str:
    """A sqlite URI with an absolute path: valid from any working directory (Ray workers have their own)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve())
    return uri


class TrackingConfig(Section):
    uri: Annotated[str, AfterValidator(absolute_uri)] = Field(
        default_factory=default_tracking_uri,
        validate_default=True,
        description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db as sqlite).",
    )
    experiment: PlainName = Field("kdray", description="MLflow experiment name.")
    run_name: PlainName | None = Field(None, description="Name of the parent run (default: method-student).")


class StoreConfig(Section):
    path: AbsolutePath = Field(
        default_factory=default_store_path,
        validate_default=True,
        description="Model store: trained models by content hash (default: $KDRAY_STORE_PATH, else .kdray/store); "
        "a file system every node reaches, with working file locks, on several nodes.",
    )
    reuse: bool = Field(
        True, description="false: every run (every search trial) trains its own teacher and assistants (a baseline)."
    )


class GuideCacheConfig(Section):
    enabled: bool = Field(
        True, description="Reuse frozen guides' logits per (training image, crop, flip) in later epochs and runs."
    )
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="Stored precision: float32 is exact, float16 halves the size and rounds the logits."
    )
    max_gb: float = Field(
        8.0, gt=0, description="Disk budget of the cache folder (old tables are evicted; big ones cover fewer images)."
    )
    path: AbsolutePath | None = Field(
        None, description="Cache folder (null = <store.path>/guide-outputs); shared by all workers, like the store."
    )


class SearchParam(Section):
    kind: Literal["float", "logfloat", "int", "choice"] = Field(description="Distribution of the parameter.")
    low: float | None = Field(None, description="Lower bound (float, logfloat, int).")
    high: float | None = Field(None, description="Upper bound (float, logfloat, int).")
    values: list[Any] | None = Field(None, description="Choices (choice).")
    methods: list[Annotated[str, _known("method")]] | None = Field(
        None, description="method.* parameters: only for these methods (default: every method that has the field)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> SearchParam:
        if self.kind == "choice":
            if not self.values:
                raise ValueError("a choice parameter needs values: [...]")
        elif self.low is None or self.high is None or self.low >= self.high:
            raise ValueError(f"a {self.kind} parameter needs low < high (here low={self.low}, high={self.high})")
        elif self.kind == "logfloat" and self.low <= 0:
            raise ValueError("a logfloat parameter needs low > 0")
        return self


class SchedulerConfig(Section):
    name: Literal["asha", "none"] = Field("asha", description="asha: stop weak trials early (ASHA); none: run all.")
    grace_period: int = Field(
        1, ge=1, le=EPOCHS_MAX, description="ASHA: epochs every trial runs before it can be stopped."
    )
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: 1/reduction_factor of trials go on at each rung.")
    max_t: int | None = Field(
        None, ge=1, le=EPOCHS_MAX, description="ASHA: the most epochs of a trial (null = train.epochs)."
    )


class SamplerConfig(Section):
    name: Literal["tpe", "gp", "random"] = Field("tpe", description="Optuna sampler: TPE, Gaussian process, random.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Sampler seed: the same search proposes the same trials.")


class SearchConfig(Section):
    name: PlainName | None = Field(None, description="Search name (Tune folder, MLflow run); null = <file>-<time>.")
    metric: str = Field("val/acc", description="Metric of the final student the search optimises (a val/* metric).")
    mode: Literal["max", "min"] = Field("max", description="Maximise or minimise the metric.")
    num_samples: int = Field(8, ge=1, le=1_000_000, description="Number of trials.")
    max_concurrent_trials: int = Field(2, ge=1, le=WORKERS_MAX, description="Trials running at the same time.")
    resources_per_trial: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="Ray resources of an in-process trial, e.g. {CPU: 2, GPU: 0.25} (fractional GPUs allowed).",
    )
    max_failures: int = Field(
        1, ge=0, le=1000, description="Retries of a trial that crashes (a diverged loss is not retried)."
    )
    guides_first: bool = Field(
        True,
        description="Train the guides every trial needs (the teacher) before the trials, with all trial slots' "
        "resources; false: the first trial that needs one trains it while the others wait.",
    )
    reuse_actors: bool = Field(
        True,
        description="Run the next in-process trial in a finished (or stopped) trial's process instead of a new one: "
        "saves the ~10 s a fresh process spends starting and importing; false: a new process per trial. "
        "Trials on Ray Train worker groups always get a new process.",
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    references: list[Annotated[str, _known("method")]] = Field(
        default_factory=lambda: ["none", "kd"],
        description="Methods also trained at their defaults with the same budget, to compare with (true = none "
        "and kd, the student alone and default KD; false or [] = none).",
    )
    space: dict[str, SearchParam] = Field(default_factory=dict, description="Dotted config field -> range.")
    register_model: bool = Field(
        True, description="Register the best trial's student in the MLflow Model Registry as <experiment>-student."
    )

    @field_validator("references", mode="before")
    @classmethod
    def _references_switch(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return ["none", "kd"] if value else []
        return value

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, metric: str) -> str:
        if not metric.startswith("val/"):
            raise ValueError(f"'{metric}': use a validation metric such as val/acc or val/loss (test/* never selects)")
        return metric


class ExperimentConfig(Section):
    """A whole experiment. Every field has a default, so an empty file is a valid digits KD run."""

    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: ModelConfig = Field(default_factory=ModelConfig)
    method: SerializeAsAny[MethodParams] = Field(default_factory=lambda: method_params({"name": DEFAULT_METHOD}))
    assistants: AssistantsConfig = Field(default_factory=AssistantsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    guide_cache: GuideCacheConfig = Field(default_factory=GuideCacheConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> MethodParams:
        """``method: {temperature: 2}`` means the default method (kd) with that temperature."""
        return method_params(value)

    @property
    def guide_cache_folder(self) -> Path:
        """Where the guide-output cache lives: ``guide_cache.path``, else inside the model store."""
        return Path(self.guide_cache.path or Path(self.store.path) / "guide-outputs")

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        from kdray.ladders import assistant_candidates, pick_assistants

        methods = _registry("method")
        if methods[self.method.name].uses_assistants:
            pick_assistants(self.teacher.name, self.student.name, self.assistants)
            ladder, source = assistant_candidates(self.teacher.name, self.student.name, self.assistants)
            unknown = [name for name in self.assistants.weights if name not in ladder]
            if unknown:
                raise ValueError(
                    f"assistants.weights: {', '.join(unknown)} is not among the assistants to pick from "
                    f"({source}: {', '.join(ladder) or 'none'})"
                )
        elif self.assistants.depth or self.assistants.models or self.assistants.weights:
            users = [name for name, method in methods.items() if method.uses_assistants]
            raise ValueError(f"assistants: only {', '.join(users)} use assistants; remove the section")
        if self.scaling.parallelism == "branches":
            self._check_branch_parallel()
        if self.scaling.sync_batchnorm and (
            self.scaling.num_workers < 1 or self.scaling.use_gpu is False or self.scaling.parallelism != "data"
        ):
            raise ValueError(
                "scaling.sync_batchnorm: needs data-parallel GPU workers (num_workers >= 1, use_gpu not false, "
                "parallelism=data); PyTorch's SyncBatchNorm runs on CUDA only"
            )
        self._check_search_fields()
        return self

    def _check_search_fields(self) -> None:
        """Every searched key is a config field; a method.* key is a field of at least one searched method."""
        space = self.search.space
        registry = _registry("method")
        methods = [self.method.name]
        if "method.name" in space:
            methods = [str(v) for v in space["method.name"].values or []]
            unknown = [m for m in methods if m not in registry]
            if space["method.name"].kind != "choice" or unknown:
                raise ValueError(f"search.space: method.name must be a choice of: {', '.join(registry.names())}")
        for key, param in space.items():
            if key == "method.name":
                continue
            if key.startswith("method."):
                field = key.removeprefix("method.")
                owners = [m for m in methods if field in registry[m].Params.model_fields]
                if not owners:
                    raise ValueError(f"search.space: '{key}' is not a parameter of {', '.join(methods)}")
                outside = [m for m in param.methods or [] if m not in methods]
                if outside:
                    raise ValueError(f"search.space: {key}.methods names {', '.join(outside)}, which is not searched")
            elif not _has_field(self, key):
                raise ValueError(
                    f"search.space: '{key}' is not a config field (use dotted names like method.temperature)"
                )

    def _check_branch_parallel(self) -> None:
        methods = _registry("method")
        count = methods[self.method.name].branch_count(self.method)
        if count is None:
            ensembles = [name for name, cls in methods.items() if cls.branch_count(cls.Params()) is not None]
            raise ValueError(
                f"scaling.parallelism=branches: method '{self.method.name}' has no branches; "
                f"use one of {', '.join(ensembles)} or scaling.parallelism=data"
            )
        if self.scaling.num_workers != count:
            raise ValueError(
                f"scaling.num_workers: parallelism=branches needs one worker per branch; set it to {count} "
                f"(the method's {count} branches)"
            )

    def dump(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-safe); ``ExperimentConfig.model_validate`` turns it back."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.dump(), sort_keys=False)


def _has_field(model: BaseModel, dotted: str) -> bool:
    node: Any = model
    for part in dotted.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            return False
        node = getattr(node, part)
    return True


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``section.field=value`` pairs on a raw config dict; values are parsed as YAML scalars."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': write section.field=value, e.g. method.temperature=4")
        values[key.strip()] = yaml.safe_load(text) if text.strip() else None
    return set_fields(raw, values)


def set_fields(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with ``{"section.field": value}`` set (the nested dicts on the way are copied)."""
    result = {key: (dict(value) if isinstance(value, dict) else value) for key, value in raw.items()}
    for key, value in values.items():
        parts = _field_path(key)
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return result


def _field_path(key: str) -> list[str]:
    """The nested keys of a dotted name. Search-space entries are themselves dotted (``method.margin``), so
    under ``search.space`` the entry is everything up to a parameter field: ``search.space.method.margin.low``
    is ``["search", "space", "method.margin", "low"]``, ``search.space.method.margin`` the entry itself."""
    parts = key.split(".")
    if parts[:2] != ["search", "space"] or len(parts) < 4:
        return parts
    if parts[-1] in SearchParam.model_fields:
        return ["search", "space", ".".join(parts[2:-1]), parts[-1]]
    return ["search", "space", ".".join(parts[2:])]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read ``path`` (None = all defaults), apply overrides and validate; ``ConfigError`` on any problem."""
    raw: Any = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"{path}: no such experiment file")
        try:
            raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
                "save the file as UTF-8"
            ) from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: an experiment file is a mapping of sections (data, teacher, ...)")
    overrides = overrides or []
    switched = [item.partition("=")[2].strip() for item in overrides if item.partition("=")[0].strip() == "method.name"]
    if switched and isinstance(raw.get("method"), dict) and raw["method"].get("name", DEFAULT_METHOD) != switched[-1]:
        # Switching method on the command line starts from the new method's defaults: the file's
        # hyperparameters belong to the old method (method.* overrides still apply).
        raw = {**raw, "method": {}}
    return validate_config(apply_overrides(raw, overrides))


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_one_line(error, raw)) from None


def _first_issue(error: ValidationError) -> tuple[list[str], Any, int]:
    """The first problem's location, the problem, and how many problems there are; a nested section's
    problem (``NestedConfigError``) is located inside it."""
    issues = error.errors()
    first = issues[0]
    loc = [str(part) for part in first["loc"]]
    nested = (first.get("ctx") or {}).get("error")
    if isinstance(nested, NestedConfigError):
        inner_loc, inner, count = _first_issue(nested.error)
        return loc + inner_loc, inner, len(issues) - 1 + count
    return loc, first, len(issues)


def _one_line(error: ValidationError, raw: dict[str, Any]) -> str:
    """The first problem as ``field: what is wrong`` (+ how many more), fit for one terminal line."""
    loc, first, count = _first_issue(error)
    field = ".".join(loc)
    message = first["msg"].removeprefix("Value error, ")
    if message.startswith("unknown method"):
        field = "method.name"
    elif first["type"] == "extra_forbidden":
        message = f"unknown key; allowed: {', '.join(_allowed_keys(loc[:-1], raw))}"
    elif first["type"] not in ("value_error", "missing") and "input" in first:
        message += f" (got {first['input']!r})"
    more = f" (+{count - 1} more)" if count > 1 else ""
    if not loc:  # whole-config checks already start their message with the field they concern
        return f"{message}{more}"
    return f"{field}: {message}{more}"


def _allowed_keys(path: list[str], raw: dict[str, Any]) -> list[str]:
    """The keys the section at ``path`` takes: the chosen method's under ``method``, a search range's under an
    entry of ``search.space`` (whose keys are dotted field names, not sections)."""
    model: type[BaseModel] = ExperimentConfig
    for depth, part in enumerate(path):
        if depth == 0 and part == "method":
            name = (raw.get("method") or {}).get("name", DEFAULT_METHOD)
            methods = _registry("method")
            model = methods[name].Params if name in methods else model
            continue
        if part not in model.model_fields:  # a key of a dict section (an entry of search.space): model stays
            continue
        annotation = model.model_fields[part].annotation
        if get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return list(model.model_fields)
