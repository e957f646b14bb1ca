"""Typed experiment configuration: dataclasses, YAML files and ``--set a.b=value`` overrides.

A config is a tree of dataclasses. ``load_config(path, overrides)`` reads YAML, applies
overrides, and validates every key and type; a mistake raises :class:`UserError` naming
the key and the allowed keys or the expected type. ``to_dict`` gives the resolved config
that is saved with every run and inside every checkpoint. Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from segan.errors import UserError, did_you_mean

DEFAULT_DATA_ROOT = "data/phantoms"


@dataclass
class PreprocessConfig:
    """Declared once, recorded in checkpoints, replayed exactly at inference."""

    orientation: str = "RAS"
    spacing: Optional[list[float]] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    normalize: str = "zscore"  # zscore (over the foreground) | percentile | ct | none
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    # normalize: ct -- per channel [low, high, mean, std] of the training set's foreground
    # (`segan plan` writes them): clip to [low, high], then (x - mean) / std
    ct_stats: Optional[list[list[float]]] = None
    crop_foreground: bool = True
    margin: int = 4
    cache_dir: Optional[str] = None  # default: $SEGAN_CACHE or ~/.cache/segan


@dataclass
class AugmentConfig:
    flip_prob: float = 0.5
    affine_prob: float = 0.2
    rotate_deg: float = 10.0
    scale: float = 0.1
    intensity_prob: float = 0.3
    intensity_shift: float = 0.1
    intensity_scale: float = 0.1


@dataclass
class DataConfig:
    root: str = DEFAULT_DATA_ROOT
    datalist: Optional[str] = None  # JSON from `segan prepare check --datalist`
    spatial_dims: int = 2
    # region name -> label ids; derived from dataset.json when unset
    regions: Optional[dict[str, list[int]]] = None
    channels: Optional[list[str]] = None  # derived from dataset.json when unset
    val_fraction: float = 0.2
    folds: Optional[int] = None
    fold: int = 0
    patch_size: list[int] = field(default_factory=lambda: [128, 128])
    # Share of samples drawn from slices/patches with a label. 0.5, not more: at 0.7 a planned
    # 2D U-Net on the phantoms learned too few empty slices and its validation Dice collapsed
    # (0.76 -> 0.26 while the training loss fell); nnU-Net oversamples a third.
    fg_fraction: float = 0.5
    samples_per_epoch: int = 512
    num_workers: int = 0
    unlabeled_batch_size: Optional[int] = None  # unlabelled items per step (default: train.batch_size)
    unlabeled: Optional[str] = None  # folder or glob of image-only scans (their labels, if any, are never read)
    labeled_cases: Optional[int] = None  # keep N labelled training cases; the others join the unlabelled stream
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    segmentor: str = "unet"  # unet | basicunet | dynunet
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 1
    norm: str = "instance"  # instance | batch (instance: 2D slice batches mix cases and empty slices)
    dropout: float = 0.0
    critic: str = "segan"  # segan | patchgan | attention | fcn | none (set by the method family)
    critic_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    critic_norm: str = "batch"  # batch | instance | none
    spectral_norm: bool = False


@dataclass
class MethodConfig:
    name: str = "segan"  # a segan.methods.METHODS name; the method's family sets the keys it owns
    w_adv: float = 0.1
    w_seg: float = 1.0
    seg_loss: str = "dicebce"  # dice | dicebce
    dice_batch: bool = True  # Dice over the whole batch, not per slice
    critic_steps: int = 1
    clamp: Optional[float] = 0.05  # critic weight clamp (SegAN); null = off
    gp_lambda: float = 10.0  # gradient penalty weight (wgangp)
    l1_weighting: str = "paper"  # paper (mean of per-scale L1) | reference (1,1,2,2,2,2,4)
    feature_norm: bool = True  # each scale's L1 relative to mean|fake| + mean|real| (in [0, 1])
    adv_warmup_epochs: int = 0  # segmentation-only epochs before the adversarial term
    adv_ramp_epochs: int = 0  # then ramp w_adv linearly over this many epochs
    # fixed: the adversarial term weighs w_adv(t); adaptive: w_adv(t) x ||grad L_seg|| / (||grad L_adv|| + 1e-4),
    # both gradients at the segmentor's last layer, clamped to [0, adv_balance_max], detached (VQGAN)
    adv_balance: str = "fixed"
    adv_balance_max: float = 1e4
    # epoch: the critic starts after adv_warmup_epochs; settled: once the epoch's loss_seg improved by less than
    # adv_settle_tol (relative) adv_settle_epochs epochs in a row, no earlier than adv_warmup_epochs, and once
    # loss_seg is at most adv_settle_below x the first epoch's (a plateau of a model that has learned nothing,
    # e.g. Dice + BCE still near its starting ~1.7, is not settled)
    adv_start: str = "epoch"
    adv_settle_tol: float = 0.02
    adv_settle_epochs: int = 2
    adv_settle_below: float = 0.5
    ema_decay: float = 0.99  # meanteacher: teacher = EMA of the student's weights
    w_consistency: float = 1.0  # meanteacher: weight of the student-teacher MSE on unlabelled images
    consistency_rampup_epochs: float = 5.0  # meanteacher: sigmoid ramp-up of w_consistency (Laine & Aila)
    consistency_noise: float = 0.1  # meanteacher: std of the Gaussian noise on the teacher's input
    w_adv_unlabeled: float = 0.001  # advsemi: adversarial weight on the unlabelled batch (the code's lambda_semi_adv)
    w_semi: float = 0.1  # advsemi: weight of the confidence-masked self-training BCE on unlabelled voxels
    semi_threshold: float = 0.2  # advsemi: a voxel joins the self-training loss where D's confidence > this
    # epochs before the unlabelled term: advsemi's self-training (the code: 5000 of 20000 steps; never before its
    # discriminator trains, whose confidence masks it), meanteacher's consistency
    semi_warmup_epochs: float = 10.0
    critic_image: bool = False  # advsemi: the discriminator also sees the image (the paper: the mask only)
    w_semi_fm: float = 0.0  # segan: weight of the critic-feature matching x_u*S(x_u) vs x*y (0 = off)


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | rmsprop
    lr: float = 1e-3
    critic_lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    critic_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])  # GAN practice (DCGAN, SegAN code)
    weight_decay: float = 0.0
    schedule: str = "cosine"  # none | step | cosine | poly | wsd
    step_epochs: int = 25
    gamma: float = 0.5
    fused: bool = True  # fused Adam/AdamW kernels where the device supports them


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 16
    max_minutes: Optional[float] = None  # wall-clock budget; then validate, save, stop
    steps_per_epoch: Optional[int] = None  # default: samples_per_epoch // batch_size
    val_every: int = 1
    val_max_cases: Optional[int] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA
    amp_cpu: bool = False  # also on CPU (pays with native bf16: AVX512-BF16 / AMX)
    channels_last: bool = True  # on CUDA only
    compile: bool = False  # torch.compile the segmentor; falls back to eager on failure
    cudnn_benchmark: bool = True
    fused_critic: bool = True  # one critic pass over [fake; real] where that equals two passes
    foreach_clamp: bool = True  # clamp critic weights with one foreach kernel, not a Python loop
    target_no_grad: bool = True  # SegAN: critic features of image*truth without autograd graph
    deterministic: bool = False
    threads: Optional[int] = None
    log_every: int = 10  # fetch losses from the device every N steps (no per-step sync)
    progress: bool = True  # a step bar on a terminal (one line per epoch is always written)
    fit_temperature: bool = False  # after training: per-region temperature on validation -> post.temperature


@dataclass
class PostprocessConfig:
    threshold: float = 0.5
    largest_component: bool = False
    min_size: int = 0  # drop connected objects smaller than this (voxels)
    fill_holes: bool = False
    temperature: Optional[list[float]] = None  # per region: p = sigmoid(logit(p) / T) (segan.calibration)
    overlap: float = 0.5  # sliding-window overlap (3D)
    sw_batch_size: int = 4


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite under ./mlflow_runs
    overlay_every: int = 5


@dataclass
class Config:
    seed: int = 0
    experiment: str = "segan"
    run_name: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    post: PostprocessConfig = field(default_factory=PostprocessConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# Values restricted to a set; checked after loading so the message lists them.
CHOICES: dict[str, tuple[str, ...]] = {
    "preprocess.normalize": ("zscore", "percentile", "ct", "none"),
    "model.segmentor": ("unet", "basicunet", "dynunet"),
    "model.norm": ("batch", "instance"),
    "model.critic": ("segan", "patchgan", "attention", "fcn", "none"),
    "model.critic_norm": ("batch", "instance", "none"),
    "method.seg_loss": ("dice", "dicebce"),
    "method.l1_weighting": ("paper", "reference"),
    "method.adv_balance": ("fixed", "adaptive"),
    "method.adv_start": ("epoch", "settled"),
    "optim.name": ("adam", "adamw", "rmsprop"),
    "optim.schedule": ("none", "step", "cosine", "poly", "wsd"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError:
                pass
        raise UserError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' expects a mapping of its sub-keys, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' expects a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' expects a mapping, got {value!r}")
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and isinstance(value, bool):
        return value
    if tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise UserError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            hint = did_you_mean(str(key), names, prefix=f"{prefix}." if prefix else "")
            raise UserError(f"unknown config key '{full}'{hint}; allowed keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _check_choices(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise UserError(f"config key '{key}' is {value!r}{did_you_mean(value, allowed)}; "
                            f"allowed values: {', '.join(allowed)}")
    from segan.methods import METHODS

    if cfg.method.name not in METHODS:
        raise UserError(
            f"config key 'method.name' is {cfg.method.name!r}{did_you_mean(cfg.method.name, METHODS)}; "
            f"allowed values: {', '.join(METHODS)}"
        )
    if cfg.data.spatial_dims not in (2, 3):
        raise UserError(f"config key 'data.spatial_dims' is {cfg.data.spatial_dims}; allowed values: 2, 3")
    if len(cfg.data.patch_size) != cfg.data.spatial_dims:
        raise UserError(
            f"config key 'data.patch_size' has {len(cfg.data.patch_size)} numbers; "
            f"it needs {cfg.data.spatial_dims} (data.spatial_dims)"
        )
    positive = {
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.val_every": cfg.train.val_every,
        "method.critic_steps": cfg.method.critic_steps,
        "method.adv_settle_epochs": cfg.method.adv_settle_epochs,
    }
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"config key '{key}' must be at least 1, got {value}")
    if cfg.method.adv_settle_below <= 0:
        raise UserError(f"config key 'method.adv_settle_below' must be positive (a share of the first epoch's "
                        f"loss_seg), got {cfg.method.adv_settle_below}")
    if cfg.post.temperature is not None and not all(t > 0 for t in cfg.post.temperature):
        raise UserError(f"config key 'post.temperature' holds one positive number per region, got "
                        f"{cfg.post.temperature}; drop it to predict uncalibrated probabilities")
    if not 0.0 <= cfg.method.semi_threshold <= 1.0:
        raise UserError(f"config key 'method.semi_threshold' is a confidence in [0, 1], got {cfg.method.semi_threshold}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.epochs=3'`` -> (['train', 'epochs'], 3); the value is parsed as YAML."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` overrides to a raw (YAML) dict; key errors surface at validation."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise UserError(f"--set {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw)
    _check_choices(cfg)
    return cfg


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass an existing YAML file, e.g. configs/segan_2d.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of keys at the top level")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The resolved config: dataclass defaults, then the method's family, then the YAML file
    (none when ``path`` is None), then ``--set`` overrides; validated
    (:func:`segan.config_layers.resolve_config` also says where each value came from)."""
    from segan.config_layers import resolve_config

    return resolve_config(path, overrides).config


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and key != "regions":
            out.update(flatten(value, full))
        else:
            out[full] = value
    return out


def dump_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically."""
    from segan.io_utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
