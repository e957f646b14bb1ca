"""What a phantom data set looks like: the knobs of ``segan prepare phantoms`` and its named variants.

Standard library only: the CLI imports this module to build its options and ``--help``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace

from segan.errors import UserError, did_you_mean

MODALITIES = ("mr", "ct")
DTYPES = ("float32", "int16", "uint8", "mixed")       # mixed: float32 and int16 cases alternate
STRUCTURES = ("tumour", "large", "small")
_AXIS_PAIRS = (("L", "R"), ("P", "A"), ("I", "S"))
SPACING_RANGE = (0.25, 8.0)                           # mm per voxel


@dataclass(frozen=True)
class PhantomSpec:
    """One phantom data set's look.

    ``channels``: 4 (T1, T1ce, T2, FLAIR) or 1 (a T1-like MR image, or the CT image);
    ``spacing``: voxel size in mm (x, y, z), the anatomy is sampled accordingly;
    ``orientation``: axis code of the stored voxel axes (RAS, LPS, LAS, ...);
    ``modality``: ``mr`` (skull-stripped brain, zero outside) or ``ct`` (Hounsfield units,
    head with skull, fat and skin in air); ``dtype``: stored voxel type (int16 with
    ``scl_slope``/``scl_inter``, uint8 rescaled to 0..255); ``structures``: ``tumour``
    (one tumour), ``large`` (one large tumour) or ``small`` (6-12 small lesions);
    ``sform_only``: qform code 0, the affine only in the sform.
    """

    channels: int = 4
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    orientation: str = "RAS"
    modality: str = "mr"
    dtype: str = "float32"
    structures: str = "tumour"
    sform_only: bool = False

    @property
    def nested(self) -> bool:
        """Nested tumour labels (1 oedema, 2 core, 3 enhancing) need all four MR contrasts
        to be told apart; every other phantom has one foreground label, ``1 lesion``."""
        return self.modality == "mr" and self.channels == 4 and self.structures != "small"

    def describe(self) -> str:
        """Short human summary, e.g. ``1-channel CT, 1x1x1 mm, LPS, int16``."""
        spacing = "x".join(f"{s:g}" for s in self.spacing)
        header = ", sform only" if self.sform_only else ""
        return (f"{self.channels}-channel {self.modality.upper()}, {spacing} mm, {self.orientation}, "
                f"{self.dtype}, {self.structures} structures{header}")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["spacing"] = list(self.spacing)
        return out


# The variants the benchmarks use; README "Phantom variants" documents each one.
VARIANTS: dict[str, PhantomSpec] = {
    "default": PhantomSpec(),
    "t1_2mm": PhantomSpec(channels=1, spacing=(2.0, 2.0, 2.0), dtype="mixed"),
    "aniso_1x1x4": PhantomSpec(spacing=(1.0, 1.0, 4.0)),
    "ct_lps_int16": PhantomSpec(channels=1, modality="ct", orientation="LPS", dtype="int16"),
    "small_lesions": PhantomSpec(structures="small", orientation="LAS", dtype="uint8", sform_only=True),
}


def parse_spacing(text: str) -> tuple[float, float, float]:
    """``"2"`` -> (2, 2, 2); ``"1,1,4"`` or ``"1x1x4"`` -> (1, 1, 4); range-checked."""
    parts = [p for p in re.split(r"[,x\s]+", str(text).strip()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    lo, hi = SPACING_RANGE
    if len(values) != 3 or not all(lo <= v <= hi for v in values):
        raise UserError(f"--spacing {text!r}: give one or three voxel sizes in mm between {lo:g} and {hi:g}, "
                        "e.g. --spacing 2 or --spacing 1,1,4")
    return values[0], values[1], values[2]


def _check_orientation(code: str) -> str:
    code = str(code).upper()
    if len(code) != 3 or any(sum(c in pair for c in code) != 1 for pair in _AXIS_PAIRS):
        raise UserError(f"--orientation {code!r}: not a 3-letter axis code with one of L/R, P/A and I/S "
                        "each, e.g. RAS, LPS or LAS")
    return code


def resolve_spec(variant: str = "default", **overrides: object) -> PhantomSpec:
    """``VARIANTS[variant]`` with every non-None override applied, checked as a whole.

    ``spacing`` may be a string (``"1,1,4"``) or three numbers. CT has one channel: a CT
    variant without an explicit ``channels`` gets 1, an explicit 4 is an error.
    """
    if variant not in VARIANTS:
        raise UserError(f"--variant {variant!r}: unknown{did_you_mean(variant, list(VARIANTS))}; choose one of "
                        f"{', '.join(VARIANTS)}")
    known = {f.name for f in fields(PhantomSpec)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown phantom option(s) {unknown}")
    given = {k: v for k, v in overrides.items() if v is not None}
    spec = replace(VARIANTS[variant], **given)
    if spec.modality not in MODALITIES:
        raise UserError(f"--modality {spec.modality!r}: choose one of {', '.join(MODALITIES)}")
    if spec.modality == "ct" and "channels" not in given:
        spec = replace(spec, channels=1)
    channels = int(spec.channels)
    if channels not in (1, 4):
        raise UserError(f"--channels {spec.channels}: choose 1 (T1-like MR, or CT) or 4 (T1, T1ce, T2, FLAIR)")
    if spec.modality == "ct" and channels != 1:
        raise UserError("--modality ct with --channels 4: CT phantoms have one channel; use --channels 1")
    if spec.dtype not in DTYPES:
        raise UserError(f"--dtype {spec.dtype!r}: choose one of {', '.join(DTYPES)}")
    if spec.structures not in STRUCTURES:
        raise UserError(f"--structures {spec.structures!r}: choose one of {', '.join(STRUCTURES)}")
    spacing = parse_spacing(spec.spacing) if isinstance(spec.spacing, str) else \
        parse_spacing(",".join(str(float(s)) for s in spec.spacing))  # type: ignore[union-attr]
    return replace(spec, channels=channels, spacing=spacing, orientation=_check_orientation(spec.orientation),
                   sform_only=bool(spec.sform_only))
