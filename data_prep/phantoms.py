"""Synthetic BraTS-like multi-modal brain phantoms in the MSD layout.

Each case is a skull-stripped brain (white matter, cortical and deep grey matter,
sulci and ventricles with CSF, enhancing vessels and choroid plexus) holding one
irregular tumour with nested labels 1 = oedema, 2 = necrotic / non-enhancing core,
3 = enhancing rim. Four contrasts (T1, T1ce, T2, FLAIR) are rendered from a table of
tissue intensities chosen so that no single channel separates the tumour: oedema
matches grey matter in T1, CSF is brighter than oedema in T2, grey matter and
periventricular caps overlap oedema in FLAIR, vessels enhance like the rim in T1ce.
The channels together tell every label apart, so a U-Net can learn the task while a
per-channel threshold cannot (see :func:`otsu_baseline`).

Rendering: tissue map -> per-channel intensity lookup -> partial-volume blur ->
smooth texture and multiplicative bias field -> Rician noise -> random gain per
channel (real scans are not in [0, 1]). Smooth random fields are drawn at low
resolution and upsampled, which keeps 24 cases of 96^3 well under a minute.

Output (``out/``)::

    dataset.json                      MSD keys + nnU-Net-v2 channel_names + regions
    imagesTr/phantom_000.nii.gz       (X, Y, Z, 4) float32, 1 mm RAS affine
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
from scipy import ndimage

from data_prep.io import save_nifti
from segan.errors import UserError
from segan.io_utils import atomic_path, atomic_write_text

CHANNELS = ("T1", "T1ce", "T2", "FLAIR")
LABELS = {0: "background", 1: "oedema", 2: "non-enhancing core", 3: "enhancing"}
REGIONS = {"whole_tumour": [1, 2, 3], "tumour_core": [2, 3], "enhancing": [3]}
DATASET_NAME = "phantoms"
_CASE_FILE = re.compile(r"^phantom_\d{3,}\.nii\.gz$")
_SUBDIRS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")

# Tissue classes of the rendering (not the labels): index -> row of _INTENSITY.
BG, CSF, GM, WM, VESSEL, CAP, OEDEMA, NECROSIS, ENHANCING = range(9)
# Mean intensity per tissue and channel (T1, T1ce, T2, FLAIR), before bias and noise.
# Why these numbers: each tumour label coincides with some normal tissue in at least
# one channel (oedema ~ GM in T1/T1ce, ~ CAP in T2/FLAIR; necrosis ~ CSF in T1/T2;
# enhancing ~ VESSEL in T1ce), and each pair differs in another channel.
_INTENSITY = np.array([
    #  T1    T1ce   T2    FLAIR
    [0.00, 0.00, 0.00, 0.00],   # BG (outside the skull-stripped brain)
    [0.25, 0.26, 1.00, 0.16],   # CSF: bright T2, suppressed in FLAIR
    [0.56, 0.58, 0.64, 0.66],   # GM
    [0.80, 0.82, 0.44, 0.50],   # WM
    [0.50, 0.98, 0.38, 0.45],   # VESSEL / choroid plexus: enhance in T1ce only
    [0.60, 0.62, 0.78, 0.78],   # CAP: periventricular FLAIR-bright caps (not tumour)
    [0.56, 0.58, 0.84, 0.80],   # OEDEMA (label 1)
    [0.30, 0.32, 0.94, 0.58],   # NECROSIS / non-enhancing core (label 2)
    [0.58, 1.00, 0.70, 0.72],   # ENHANCING rim (label 3)
], dtype=np.float32)


# --------------------------------------------------------------------- random fields
def _linear_weights(size: int, low: int, factor: int) -> np.ndarray:
    """``(size, low)`` matrix of linear-interpolation weights from a grid of step ``factor``."""
    pos = np.arange(size, dtype=np.float64) / factor
    left = np.minimum(np.floor(pos).astype(int), low - 2)
    frac = pos - left
    w = np.zeros((size, low), dtype=np.float32)
    w[np.arange(size), left] = 1 - frac
    w[np.arange(size), left + 1] = frac
    return w


def _smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """``(size, size, size)`` float32 Gaussian random field, zero mean, unit std.

    ``scale`` is the correlation length in voxels. Drawn on a coarse grid (about
    three samples per correlation length) and upsampled trilinearly, one axis at a
    time as a matrix product: far cheaper than blurring full-resolution noise.
    """
    factor = max(1, int(scale / 3))
    low = -(-size // factor) + 2
    noise = rng.standard_normal((low, low, low)).astype(np.float32)
    field = ndimage.gaussian_filter(noise, sigma=scale / factor, mode="wrap")
    if factor > 1:
        w = _linear_weights(size, low, factor)
        field = np.tensordot(w, field, axes=(1, 0))                        # (S, l, l)
        field = np.tensordot(w, field, axes=(1, 1)).transpose(1, 0, 2)     # (S, S, l)
        field = field @ w.T                                                # (S, S, S)
    field = np.ascontiguousarray(field[:size, :size, :size], dtype=np.float32)
    field -= field.mean()
    return field / (field.std() + 1e-8)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel coordinates centred on the volume, each broadcastable to (size,)*3."""
    ax = np.arange(size, dtype=np.float32) - (size - 1) / 2
    return ax[:, None, None], ax[None, :, None], ax[None, None, :]


def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    """Normalised radius ``sqrt(sum(((p - c) / r)^2))``; < 1 inside the ellipsoid."""
    return np.sqrt(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                   + ((z - centre[2]) / radii[2]) ** 2)


# ----------------------------------------------------------------------- anatomy
def _anatomy(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map ``(S, S, S)`` uint8 (BG..CAP) and the brain's normalised radius."""
    x, y, z = _grid(size)
    s = float(size)
    # Brain: an ellipsoid (RAS: x left-right, y posterior-anterior, z inferior-superior)
    # with a smooth, low-frequency deformation of its surface.
    radii = s * np.array([0.37, 0.44, 0.36]) * rng.uniform(0.92, 1.05, 3)
    rho = _ellipsoid(x, y, z, (0.0, 0.0, s * 0.02), radii)
    rho = rho * (1 + 0.04 * _smooth_field(rng, size, s / 4))
    brain = rho < 1.0
    depth = (1.0 - rho) * radii.mean()            # approx. distance from the surface (mm)

    tissue = np.full((size,) * 3, WM, dtype=np.uint8)
    # Cortex of varying thickness, cut by CSF-filled sulci (sheets where a band-pass
    # field crosses zero, reaching into the cortex from the surface).
    thickness = s * 0.06 * (1 + 0.3 * _smooth_field(rng, size, s / 6))
    cortex = depth < thickness
    tissue[cortex] = GM
    folds = _smooth_field(rng, size, s / 16)
    sulci = cortex & (np.abs(folds) < 0.22) & (depth < thickness * 0.9)
    tissue[sulci | (depth < 1.0)] = CSF
    # Deep grey nuclei (basal ganglia / thalamus-like), both hemispheres.
    for side in (-1, 1):
        c = (side * s * 0.11, s * rng.uniform(-0.03, 0.03), s * 0.0)
        tissue[_ellipsoid(x, y, z, c, s * np.array([0.06, 0.09, 0.07])) < 1] = GM
    # Lateral ventricles with FLAIR-bright periventricular caps at their horns.
    vent_scale = rng.uniform(0.8, 1.3)
    for side in (-1, 1):
        c = (side * s * 0.05, s * 0.0, s * 0.07)
        r = s * np.array([0.035, 0.17, 0.06]) * vent_scale
        vr = _ellipsoid(x, y, z, c, r)
        caps = (vr < 1.35) & (np.abs(y) > r[1] * 0.6)
        tissue[caps & (tissue == WM)] = CAP
        tissue[vr < 1] = CSF
    # Choroid plexus: small enhancing blobs inside the ventricles.
    blobs = _smooth_field(rng, size, s / 24)
    tissue[(tissue == CSF) & (depth > s * 0.15) & (blobs > 1.6)] = VESSEL
    # Vessels: curves where two smooth fields both cross zero (enhance in T1ce).
    f1, f2 = _smooth_field(rng, size, s / 10), _smooth_field(rng, size, s / 10)
    vessels = (np.abs(f1) < 0.07) & (np.abs(f2) < 0.07) & (depth > 1.0)
    tissue[vessels] = VESSEL
    tissue[~brain] = BG
    return tissue, rho


def _tumour(rng: np.random.Generator, size: int, rho: np.ndarray) -> np.ndarray:
    """Nested tumour label map ``(S, S, S)`` uint8: 1 oedema, 2 core, 3 enhancing."""
    x, y, z = _grid(size)
    s = float(size)
    inside = ndimage.binary_erosion(rho < 1.0, iterations=2)
    candidates = np.flatnonzero(rho.ravel() < 0.6)   # tumour centres well inside the brain
    for _ in range(20):  # redraw the rare tumour that leaves a label empty
        ijk = np.unravel_index(candidates[rng.integers(len(candidates))], rho.shape)
        centre = np.array(ijk, dtype=np.float64) - (size - 1) / 2
        r_whole = s * rng.uniform(0.12, 0.22) * rng.uniform(0.8, 1.2, 3)
        q = _ellipsoid(x, y, z, centre, r_whole)
        whole = (q + 0.35 * _smooth_field(rng, size, s / 10) < 1.0) & inside
        # Core: a smaller, off-centre blob inside the oedema.
        k = rng.uniform(0.45, 0.7)
        c_core = centre + rng.uniform(-0.25, 0.25, 3) * r_whole * (1 - k)
        q_core = _ellipsoid(x, y, z, c_core, r_whole * k) + 0.25 * _smooth_field(rng, size, s / 14)
        core = (q_core < 1.0) & whole
        # Enhancing rim: the core's outer shell, interrupted in places.
        inner = q_core < 1.0 - rng.uniform(0.25, 0.45)
        gaps = _smooth_field(rng, size, s / 12) < -0.8
        rim = core & ~inner & ~gaps
        label = np.zeros((size,) * 3, dtype=np.uint8)
        label[whole] = 1
        label[core] = 2
        label[rim] = 3
        counts = np.bincount(label.ravel(), minlength=4)
        if counts[1:].min() >= max(8, (size // 16) ** 3):
            return label
    raise RuntimeError("could not draw a tumour with all three labels")  # pragma: no cover


def _render(rng: np.random.Generator, tissue: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Four-channel scan ``(S, S, S, 4)`` float32 from the tissue and tumour maps."""
    size = tissue.shape[0]
    s = float(size)
    classes = tissue.copy()
    classes[label == 1] = OEDEMA
    classes[label == 2] = NECROSIS
    classes[label == 3] = ENHANCING
    brain = tissue != BG
    # Intensities jitter a little per case, as between scanners.
    table = _INTENSITY * rng.uniform(0.96, 1.04, _INTENSITY.shape).astype(np.float32)
    # Oedema infiltrates: near its border the scan is a mix of oedema and the tissue
    # underneath (weight 0.6 at the edge, 1 from 2 voxels inside), so the visible
    # edge is soft while the label stays a hard mask, as in annotated scans.
    oedema = label == 1
    weight = np.ones(tissue.shape, dtype=np.float32)
    box = ndimage.find_objects(oedema.astype(np.uint8))[0]
    box = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)
    depth = ndimage.distance_transform_edt(label[box] > 0).astype(np.float32)
    weight[box] = np.where(oedema[box], np.clip(0.6 + 0.4 * (depth - 1) / 2, 0.6, 1.0), 1.0)
    texture = _smooth_field(rng, size, s / 20)
    shared_bias = _smooth_field(rng, size, s / 1.5)
    out = np.empty((size, size, size, len(CHANNELS)), dtype=np.float32)
    for ch in range(len(CHANNELS)):
        mixed = weight * table[classes, ch] + (1 - weight) * table[tissue, ch]
        img = ndimage.gaussian_filter(mixed, sigma=0.7)                  # partial volume
        bias = np.exp(0.10 * shared_bias + 0.05 * _smooth_field(rng, size, s / 1.5))
        img = img * bias * (1 + 0.04 * texture)
        sigma = 0.035
        noise_re = rng.standard_normal(img.shape, dtype=np.float32) * sigma
        noise_im = rng.standard_normal(img.shape, dtype=np.float32) * sigma
        img = np.sqrt((img + noise_re) ** 2 + noise_im ** 2)             # Rician magnitude
        gain = rng.uniform(300.0, 1500.0)
        out[..., ch] = np.where(brain, img * gain, 0.0)
    return out


def _case(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: image ``(S, S, S, 4)`` float32 and label ``(S, S, S)`` uint8."""
    rng = np.random.default_rng([seed, index])
    tissue, rho = _anatomy(rng, size)
    label = _tumour(rng, size, rho)
    image = _render(rng, tissue, label)
    return image, label


def phantom_affine(size: int) -> np.ndarray:
    """1 mm isotropic RAS affine with the volume centred on the world origin."""
    affine = np.eye(4)
    affine[:3, 3] = -(size // 2)
    return affine


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


def generate(out: Path, cases: int = 24, size: int = 96, seed: int = 0,
             test_fraction: float = 0.25) -> str:
    """Write ``cases`` phantoms of ``size``^3 voxels to ``out`` in the MSD layout.

    The last ``round(cases * test_fraction)`` cases go to ``imagesTs``/``labelsTs``.
    Returns a one-paragraph summary for the CLI.
    """
    out = Path(out)
    if cases < 2:
        raise UserError(f"--cases {cases}: need at least 2 cases")
    if size < 32:
        raise UserError(f"--size {size}: need at least 32 voxels per side")
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"--test-fraction {test_fraction}: must be in [0, 1)")
    n_test = min(int(round(cases * test_fraction)), cases - 1)
    start = time.perf_counter()
    _prepare_out(out)
    affine = phantom_affine(size)
    training, test = [], []
    voxels = np.zeros(4, dtype=np.int64)
    for i in range(cases):
        name = f"phantom_{i:03d}.nii.gz"
        is_test = i >= cases - n_test
        img_dir, lab_dir = ("imagesTs", "labelsTs") if is_test else ("imagesTr", "labelsTr")
        image, label = _case(seed, i, size)
        voxels += np.bincount(label.ravel(), minlength=4)[:4]
        save_nifti(out / img_dir / name, image, affine, dtype=np.float32)
        save_nifti(out / lab_dir / name, label, affine, dtype=np.uint8)
        if is_test:
            test.append(f"./imagesTs/{name}")
        else:
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    channel_names = {str(i): c for i, c in enumerate(CHANNELS)}
    meta = {
        "name": DATASET_NAME,
        "description": ("Synthetic BraTS-like multi-modal brain phantoms with nested tumour labels "
                        f"(segan data_prep.phantoms, seed {seed}, {size}^3 voxels, 1 mm)"),
        "reference": "generated by `segan prepare phantoms`",
        "licence": "CC0",
        "tensorImageSize": "4D",
        "modality": channel_names,
        "channel_names": channel_names,
        "labels": {str(k): v for k, v in LABELS.items()},
        "regions": REGIONS,
        "file_ending": ".nii.gz",
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=2) + "\n")
    seconds = time.perf_counter() - start
    share = voxels[1:] / max(1, voxels.sum()) * 100
    return (f"Wrote {cases} phantom cases ({len(training)} training, {len(test)} test) of "
            f"{size}^3 voxels at 1 mm with 4 channels ({', '.join(CHANNELS)}) to {out} in "
            f"{seconds:.1f} s. Labels: 1 oedema ({share[0]:.2f}% of voxels), 2 non-enhancing core "
            f"({share[1]:.2f}%), 3 enhancing ({share[2]:.2f}%); regions whole_tumour/tumour_core/"
            f"enhancing = {{1,2,3}}/{{2,3}}/{{3}}. Test labels are in {out / 'labelsTs'}. "
            f"Validate with: segan prepare check {out}")


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


def otsu_baseline(root: Path) -> dict:
    """Whole-tumour Dice of a one-channel Otsu threshold, per channel, on the test cases.

    For each case and channel the threshold is Otsu's, computed on the brain voxels
    (non-zero in any channel); the tumour is taken as the side of the threshold
    (above or below) that scores better on average for that channel, which favours
    the baseline. Returns ``{"per_modality": {name: mean Dice}, "best_modality",
    "best_dice", "polarity": {name: "above"|"below"}, "cases"}``.
    """
    from skimage.filters import threshold_otsu

    from data_prep.io import load_image, load_label

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        denom = a.sum() + b.sum()
        return float(2 * np.logical_and(a, b).sum() / denom) if denom else 1.0

    scores = {c: {"above": [], "below": []} for c in CHANNELS}
    pairs = _test_pairs(Path(root))
    for img_path, lab_path in pairs:
        image, _ = load_image(img_path)
        label, _ = load_label(lab_path)
        brain = np.any(image != 0, axis=0)
        truth = label[brain] > 0
        for ch, name in enumerate(CHANNELS):
            values = image[ch][brain]
            thr = threshold_otsu(values)
            scores[name]["above"].append(dice(values > thr, truth))
            scores[name]["below"].append(dice(values <= thr, truth))
    per_mod, polarity = {}, {}
    for name in CHANNELS:
        side = max(("above", "below"), key=lambda k: np.mean(scores[name][k]))
        polarity[name] = side
        per_mod[name] = round(float(np.mean(scores[name][side])), 4)
    best = max(per_mod, key=per_mod.get)
    return {"per_modality": per_mod, "best_modality": best, "best_dice": per_mod[best],
            "polarity": polarity, "cases": len(pairs)}


def render_figure(root: Path, out_png: Path, n_cases: int = 3) -> Path:
    """Axial slices through the tumour of ``n_cases`` test cases, every channel,
    with whole-tumour / core / enhancing contours; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.measure import find_contours

    from data_prep.io import load_image, load_label

    pairs = _test_pairs(Path(root))[:n_cases]
    colours = {"whole_tumour": "#ffd700", "tumour_core": "#ff3030", "enhancing": "#00e5ff"}
    widths = {"whole_tumour": 0.8, "tumour_core": 1.6, "enhancing": 0.6}
    fig, axes = plt.subplots(len(pairs), len(CHANNELS), figsize=(2.4 * len(CHANNELS), 2.5 * len(pairs)),
                             squeeze=False)
    for row, (img_path, lab_path) in enumerate(pairs):
        image, _ = load_image(img_path)
        label, _ = load_label(lab_path)
        z = int(np.argmax((label > 0).sum(axis=(0, 1))))   # slice with most tumour
        for col, name in enumerate(CHANNELS):
            ax = axes[row, col]
            sl = image[col, :, :, z]
            vmax = np.percentile(sl[sl > 0], 99.5) if np.any(sl > 0) else 1.0
            # RAS array (x, y): transpose so anterior is up, and flip x to radiological view.
            ax.imshow(sl.T[::-1, ::-1], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
            for region, ids in REGIONS.items():
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
