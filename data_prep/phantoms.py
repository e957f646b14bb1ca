"""Synthetic BraTS-like brain phantoms in the MSD layout, in several variants.

The default case is a skull-stripped brain (white matter, cortical and deep grey matter,
sulci and ventricles with CSF, enhancing vessels and choroid plexus) holding one
irregular tumour with nested labels 1 = oedema, 2 = necrotic / non-enhancing core,
3 = enhancing rim. Four contrasts (T1, T1ce, T2, FLAIR) are rendered from a table of
tissue intensities chosen so that no single channel separates the tumour: oedema
matches grey matter in T1, CSF is brighter than oedema in T2, grey matter and
periventricular caps overlap oedema in FLAIR, vessels enhance like the rim in T1ce.
The channels together tell every label apart, so a U-Net can learn the task while a
per-channel threshold cannot (see :func:`otsu_baseline`).

Variants (:class:`~data_prep.phantom_spec.PhantomSpec`, named presets in ``VARIANTS``)
change what real data sets differ in: one T1-like channel, voxel size (the anatomy is
averaged onto coarser or anisotropic voxels), stored orientation, CT in Hounsfield
units (head with skull, fat and skin in air), int16 with header scaling or uint8,
one large tumour or many small lesions, sform-only headers. Everything but the nested
four-channel MR tumour has one foreground label, 1 = lesion. Geometry lives in
:mod:`data_prep.phantom_anatomy`, contrast and encoding in :mod:`data_prep.phantom_render`.

Output (``out/``)::

    dataset.json                      MSD keys + nnU-Net-v2 channel_names + regions + "phantom"
    imagesTr/phantom_000.nii.gz       (X, Y, Z, 4) float32, 1 mm RAS affine (default)
    labelsTr/phantom_000.nii.gz       (X, Y, Z) uint8 in {0, 1, 2, 3}
    imagesTs/, labelsTs/              held-out test cases (labels kept apart)

Files are byte-identical for the same arguments (per-case seeded RNG, gzip headers
without time stamps or names, atomic writes).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from data_prep.io import save_nifti
from data_prep.phantom_anatomy import ENHANCING, LESION, NECROSIS, OEDEMA, add_head_layers, anatomy, small_lesions, tumour
from data_prep.phantom_render import Grid, downsample_label, encode, make_grid, render, reorient
from data_prep.phantom_spec import VARIANTS, PhantomSpec, resolve_spec
from segan.errors import UserError
from segan.io_utils import atomic_path, atomic_write_text

CHANNELS = ("T1", "T1ce", "T2", "FLAIR")
LABELS = {0: "background", 1: "oedema", 2: "non-enhancing core", 3: "enhancing"}
REGIONS = {"whole_tumour": [1, 2, 3], "tumour_core": [2, 3], "enhancing": [3]}
DATASET_NAME = "phantoms"
_CASE_FILE = re.compile(r"^phantom_\d{3,}\.nii\.gz$")
_SUBDIRS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")

LESION_LABELS = {0: "background", 1: "lesion"}
LESION_REGIONS = {"lesion": [1]}
CT_EXTENT = 0.8            # CT: a smaller brain, so that skull, fat and skin fit in the field of view
_LARGE_RADIUS = (0.22, 0.30)
MAX_GENERATION_SIZE = 384  # voxels per side of the generation grid (memory)


def _channel_names(spec: PhantomSpec) -> tuple[str, ...]:
    if spec.modality == "ct":
        return ("CT",)
    return CHANNELS if spec.channels == 4 else ("T1",)


def _survives(spec: PhantomSpec, grid: Grid):
    """A draw is kept only if every label it must show is still there on the output grid."""
    if grid.identity:
        return None
    needed = (1, 2, 3) if spec.nested else (1,)

    def accept(label: np.ndarray) -> bool:
        coarse = downsample_label(label, grid)
        return all(np.any(coarse == k) for k in needed)
    return accept


def _case(seed: int, index: int, spec: PhantomSpec, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """One phantom on the output grid (RAS): image ``(X, Y, Z, C)`` float32, label ``(X, Y, Z)`` uint8."""
    rng = np.random.default_rng([seed, index])
    ct = spec.modality == "ct"
    extent = CT_EXTENT if ct else 1.0
    tissue, rho = anatomy(rng, grid.size, extent)
    accept = _survives(spec, grid)
    if spec.structures == "small":
        label = small_lesions(rng, grid.size, rho, tissue, extent, accept=accept)
        parts = {1: LESION}
    else:
        radius = _LARGE_RADIUS if spec.structures == "large" else (0.12, 0.22)
        label = tumour(rng, grid.size, rho, extent, radius, accept=accept)
        parts = {1: OEDEMA, 2: NECROSIS, 3: ENHANCING}
    if ct:
        add_head_layers(tissue, rho, extent)
    image = render(rng, tissue, label, parts, spec, grid)
    label = downsample_label(label, grid)
    if not spec.nested:
        label = (label > 0).astype(np.uint8)
    return image, label


def phantom_affine(size: int, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """RAS affine of a ``size`` mm field of view at ``spacing``, centred on the world origin
    (1 mm: identity rotation, offset ``-(size // 2)``)."""
    return make_grid(size, spacing).affine


def variant_name(spec: PhantomSpec) -> str:
    """The preset ``spec`` equals, or ``custom``."""
    return next((name for name, preset in VARIANTS.items() if resolve_spec(name) == spec), "custom")

# ----------------------------------------------------------------------- writing
def _prepare_out(out: Path) -> None:
    """Refuse to write into a non-empty folder that is not an earlier phantom set."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        meta = out / "dataset.json"
        try:
            is_phantoms = json.loads(meta.read_text()).get("name") == DATASET_NAME
        except (OSError, ValueError, AttributeError):
            # No readable dataset.json: ours only if it holds nothing but phantom files
            # (an interrupted earlier run).
            is_phantoms = all(
                p.is_dir() and p.name in _SUBDIRS
                and all(_CASE_FILE.match(f.name) or f.name.startswith(".") for f in p.iterdir())
                for p in out.iterdir())
        if not is_phantoms:
            raise UserError(f"{out}: folder is not empty and holds no phantom data set; "
                            "choose another --out or empty it")
        # Regenerating: drop the old cases so none outlive a smaller --cases.
        for f in sorted(out.glob("*/phantom_*.nii.gz")):
            if f.parent.name in _SUBDIRS and _CASE_FILE.match(f.name):
                f.unlink()


def generate(out: Path, cases: int = 24, size: int = 96, seed: int = 0, test_fraction: float = 0.25,
             spec: PhantomSpec | None = None) -> str:
    """Write ``cases`` phantoms with a field of view of ``size`` mm per side (``size``^3
    voxels at the default 1 mm) to ``out`` in the MSD layout; ``spec``: the variant
    (default :data:`VARIANTS` ``["default"]``).

    The last ``round(cases * test_fraction)`` cases go to ``imagesTs``/``labelsTs``.
    Returns a one-paragraph summary for the CLI.
    """
    out = Path(out)
    spec = resolve_spec(**(spec or VARIANTS["default"]).as_dict())
    if cases < 2:
        raise UserError(f"--cases {cases}: need at least 2 cases")
    if size < 32:
        raise UserError(f"--size {size}: need at least 32 (mm, voxels at 1 mm) per side")
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"--test-fraction {test_fraction}: must be in [0, 1)")
    grid = make_grid(size, spec.spacing)
    if min(grid.shape) < 8:
        raise UserError(f"--size {size} at --spacing {'x'.join(f'{s:g}' for s in spec.spacing)} mm gives only "
                        f"{grid.shape} voxels; need at least 8 per axis: raise --size or lower --spacing")
    if grid.size > MAX_GENERATION_SIZE:
        raise UserError(f"--size {size} at {grid.voxel:g} mm needs a {grid.size}^3 generation grid (at most "
                        f"{MAX_GENERATION_SIZE}^3); lower --size or raise the finest --spacing")
    n_test = min(int(round(cases * test_fraction)), cases - 1)
    start = time.perf_counter()
    _prepare_out(out)
    labels, regions = (LABELS, REGIONS) if spec.nested else (LESION_LABELS, LESION_REGIONS)
    training, test = [], []
    voxels = np.zeros(len(labels), dtype=np.int64)
    shape = affine = None
    for i in range(cases):
        name = f"phantom_{i:03d}.nii.gz"
        is_test = i >= cases - n_test
        img_dir, lab_dir = ("imagesTs", "labelsTs") if is_test else ("imagesTr", "labelsTr")
        image, label = _case(seed, i, spec, grid)
        voxels += np.bincount(label.ravel(), minlength=len(labels))[:len(labels)]
        image, label, affine = reorient(image[..., 0] if spec.channels == 1 else image, label, grid.affine,
                                        spec.orientation)
        shape = label.shape
        stored, dtype, scaling = encode(image, spec, i)
        save_nifti(out / img_dir / name, stored, affine, dtype=dtype, scaling=scaling, sform_only=spec.sform_only)
        save_nifti(out / lab_dir / name, label, affine, dtype=np.uint8, sform_only=spec.sform_only)
        if is_test:
            test.append(f"./imagesTs/{name}")
        else:
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    channels = _channel_names(spec)
    channel_names = {str(i): c for i, c in enumerate(channels)}
    variant = variant_name(spec)
    spacing = "x".join(f"{s:g}" for s in spec.spacing)
    if variant == "default":
        description = ("Synthetic BraTS-like multi-modal brain phantoms with nested tumour labels "
                       f"(segan data_prep.phantoms, seed {seed}, {size}^3 voxels, 1 mm)")
    else:
        description = (f"Synthetic brain phantoms, variant {variant}: {spec.describe()} (segan data_prep.phantoms, "
                       f"seed {seed}, {'x'.join(map(str, shape))} voxels)")
    meta = {
        "name": DATASET_NAME,
        "description": description,
        "reference": "generated by `segan prepare phantoms`",
        "licence": "CC0",
        "tensorImageSize": "4D" if len(channels) > 1 else "3D",
        "modality": channel_names,
        "channel_names": channel_names,
        "labels": {str(k): v for k, v in labels.items()},
        "regions": regions,
        "file_ending": ".nii.gz",
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
        "phantom": {"variant": variant, **spec.as_dict(), "size_mm": size, "seed": seed},
    }
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=2) + "\n")
    seconds = time.perf_counter() - start
    share = voxels[1:] / max(1, voxels.sum()) * 100
    label_text = ", ".join(f"{k} {v} ({p:.2f}% of voxels)" for (k, v), p in zip(list(labels.items())[1:], share))
    region_text = "; ".join(f"{r} = {{{','.join(map(str, ids))}}}" for r, ids in regions.items())
    return (f"Wrote {cases} phantom cases ({len(training)} training, {len(test)} test) of "
            f"{'x'.join(map(str, shape))} voxels at {spacing} mm ({spec.orientation}, {spec.dtype}"
            f"{', sform only' if spec.sform_only else ''}, variant {variant}) with {len(channels)} channel(s) "
            f"({', '.join(channels)}) to {out} in {seconds:.1f} s. Labels: {label_text}; regions {region_text}. "
            f"Test labels are in {out / 'labelsTs'}. Validate with: segan prepare check {out}")


# ------------------------------------------------------------ baseline and figure
def _test_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs of the test cases, or of the training cases if none."""
    root = Path(root)
    pairs = [(p, root / "labelsTs" / p.name) for p in sorted((root / "imagesTs").glob("phantom_*.nii.gz"))]
    pairs = [(i, lab) for i, lab in pairs if lab.exists()]
    if not pairs:
        pairs = [(p, root / "labelsTr" / p.name) for p in sorted((root / "imagesTr").glob("phantom_*.nii.gz"))]
    if not pairs:
        raise UserError(f"{root}: no phantom cases found; run `segan prepare phantoms --out {root}`")
    return pairs


def _channels_and_regions(root: Path) -> tuple[tuple[str, ...], dict[str, list[int]]]:
    """Channel names and regions of a phantom set (any variant) from its dataset.json."""
    try:
        meta = json.loads((Path(root) / "dataset.json").read_text())
        names = tuple(v for _, v in sorted(meta["channel_names"].items(), key=lambda kv: int(kv[0])))
        return names, {k: list(v) for k, v in meta["regions"].items()}
    except (OSError, ValueError, KeyError, AttributeError):
        return CHANNELS, REGIONS


def _read_ras(img_path: Path, lab_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Image ``(C, X, Y, Z)`` and label of a case with the voxel axes in RAS order (any stored orientation)."""
    import nibabel as nib

    from data_prep.io import load_image, load_label

    image, affine = load_image(img_path)
    label, _ = load_label(lab_path)
    ornt = nib.orientations.io_orientation(affine)
    return (np.stack([nib.orientations.apply_orientation(c, ornt) for c in image]),
            nib.orientations.apply_orientation(label, ornt))


def otsu_baseline(root: Path) -> dict:
    """Whole-tumour Dice of a one-channel Otsu threshold, per channel, on the test cases.

    For each case and channel the threshold is Otsu's, computed on the brain voxels
    (above the channel's minimum in any channel; the whole head in CT); the tumour is taken as the side of the threshold
    (above or below) that scores better on average for that channel, which favours
    the baseline. Returns ``{"per_modality": {name: mean Dice}, "best_modality",
    "best_dice", "polarity": {name: "above"|"below"}, "cases"}``.
    """
    from skimage.filters import threshold_otsu

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        denom = a.sum() + b.sum()
        return float(2 * np.logical_and(a, b).sum() / denom) if denom else 1.0

    channels, _ = _channels_and_regions(root)
    scores = {c: {"above": [], "below": []} for c in channels}
    pairs = _test_pairs(Path(root))
    for img_path, lab_path in pairs:
        image, label = _read_ras(img_path, lab_path)
        brain = np.any(image > image.min(axis=(1, 2, 3), keepdims=True), axis=0)
        truth = label[brain] > 0
        for ch, name in enumerate(channels):
            values = image[ch][brain]
            thr = threshold_otsu(values)
            scores[name]["above"].append(dice(values > thr, truth))
            scores[name]["below"].append(dice(values <= thr, truth))
    per_mod, polarity = {}, {}
    for name in channels:
        side = max(("above", "below"), key=lambda k: np.mean(scores[name][k]))
        polarity[name] = side
        per_mod[name] = round(float(np.mean(scores[name][side])), 4)
    best = max(per_mod, key=per_mod.get)
    return {"per_modality": per_mod, "best_modality": best, "best_dice": per_mod[best],
            "polarity": polarity, "cases": len(pairs)}


def render_figure(root: Path, out_png: Path, n_cases: int = 3) -> Path:
    """Axial slices through the tumour of ``n_cases`` test cases, every channel,
    with the region contours (whole tumour / core / enhancing); written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.measure import find_contours

    channels, regions = _channels_and_regions(root)
    pairs = _test_pairs(Path(root))[:n_cases]
    palette = {"whole_tumour": ("#ffd700", 0.8), "tumour_core": ("#ff3030", 1.6), "enhancing": ("#00e5ff", 0.6)}
    colours = {r: palette.get(r, ("#ffd700", 0.8))[0] for r in regions}
    widths = {r: palette.get(r, ("#ffd700", 0.8))[1] for r in regions}
    fig, axes = plt.subplots(len(pairs), len(channels), figsize=(2.4 * len(channels), 2.5 * len(pairs)),
                             squeeze=False)
    for row, (img_path, lab_path) in enumerate(pairs):
        image, label = _read_ras(img_path, lab_path)
        z = int(np.argmax((label > 0).sum(axis=(0, 1))))   # slice with most tumour
        for col, name in enumerate(channels):
            ax = axes[row, col]
            sl = image[col, :, :, z]
            vmin = float(sl.min())
            vmax = np.percentile(sl[sl > vmin], 99.5) if np.any(sl > vmin) else vmin + 1.0
            # RAS array (x, y): transpose so anterior is up, and flip x to radiological view.
            ax.imshow(sl.T[::-1, ::-1], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            for region, ids in regions.items():
                mask = np.isin(label[:, :, z], ids).T[::-1, ::-1]
                for contour in find_contours(mask.astype(np.float32), 0.5):
                    ax.plot(contour[:, 1], contour[:, 0], color=colours[region], linewidth=widths[region])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name)
            if col == 0:
                ax.set_ylabel(f"{img_path.name.split('.')[0]}, z={z}", fontsize=8)
    handles = [plt.Line2D([], [], color=c, label=r.replace("_", " ")) for r, c in colours.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return out_png
