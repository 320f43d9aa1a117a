"""`python -m medconv_ext.train make-demo-data DIR`: a small synthetic labelled dataset on disk, in
the Medical Segmentation Decathlon layout (or nnU-Net's raw layout with --layout nnunet), to try
`seg --data` and `tile --argmax` on.

Each case is a volume (48^3 by default) of a body (a large ellipsoid, label 0) holding an "organ"
(a deformed, rotated ellipsoid, label 1) with one or two "lesions" (spheres, label 2) in it, plus
a tube of organ-like brightness outside the organ (a distractor, label 0). The intensities vary
from case to case (a global gain), a smooth multiplicative bias field (+-20 %) and Gaussian noise
are added; MR-like units by default, Hounsfield-like ones with --modality CT. Every case is a pure
function of (seed, case index); affines are diagonal with 1 mm voxels (1.5 mm along z with
--modality CT).
"""
import json
import math
import os
import sys
from typing import Tuple

import numpy as np

LABELS = {0: "background", 1: "organ", 2: "lesion"}


def _rotation(rng) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                     [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
                     [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]])


def make_case(index: int, size=(48, 48, 48), seed: int = 0, modality: str = "MR", channels: int = 1
              ) -> Tuple[np.ndarray, np.ndarray]:
    """(image float32 (X, Y, Z) or (X, Y, Z, C), label uint8 (X, Y, Z)) of case `index`."""
    rng = np.random.default_rng([int(seed), int(index), 7919])
    size = tuple(int(s) for s in size)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij"), -1)
    n = np.array(size, dtype=np.float64)
    u = (grid - (n - 1) / 2) / (n / 2)  # [-1, 1] per axis
    body = (u[..., 0] / 0.95) ** 2 + (u[..., 1] / 0.85) ** 2 + (u[..., 2] / 0.95) ** 2 <= 1.0
    # organ: a rotated ellipsoid with a smooth radial deformation
    c = rng.uniform(-0.12, 0.12, 3)
    ax = rng.uniform(0.45, 0.62, 3)
    R = _rotation(rng)
    v = (u - c) @ R
    r = np.sqrt(((v / ax) ** 2).sum(-1))
    th = np.arctan2(v[..., 1], v[..., 0])
    ph = np.arctan2(v[..., 2], np.hypot(v[..., 0], v[..., 1]))
    k1, k2 = rng.integers(2, 4, 2)
    p1, p2 = rng.uniform(0, 2 * math.pi, 2)
    deform = 1.0 + 0.12 * np.sin(k1 * th + p1) * np.cos(k2 * ph + p2)
    organ = (r <= deform) & body
    label = organ.astype(np.uint8)
    # lesions: 1-2 spheres inside the organ
    inside = np.argwhere((r <= 0.55 * deform) & body)
    for _ in range(int(rng.integers(1, 3))):
        if len(inside) == 0:
            break
        p = inside[int(rng.integers(len(inside)))]
        rad = rng.uniform(0.08, 0.12) * min(size)
        d2 = ((grid - p) ** 2).sum(-1)
        label[(d2 <= rad * rad) & organ] = 2
    # distractor tube (label 0): a segment of organ-like brightness outside the organ
    a0, a1 = rng.uniform(-0.8, 0.8, 3), rng.uniform(-0.8, 0.8, 3)
    seg = a1 - a0
    t = np.clip(((u - a0) @ seg) / max(seg @ seg, 1e-9), 0, 1)
    dist = np.linalg.norm(u - (a0 + t[..., None] * seg), axis=-1)
    tube = (dist <= rng.uniform(0.05, 0.08)) & body & ~organ
    # bias field: a random low-order polynomial, +-20 %
    coef = rng.uniform(-1, 1, 6)
    bias = 1.0 + 0.2 * np.tanh(coef[0] * u[..., 0] + coef[1] * u[..., 1] + coef[2] * u[..., 2]
                               + 0.5 * (coef[3] * u[..., 0] * u[..., 1] + coef[4] * u[..., 1] * u[..., 2]
                                        + coef[5] * u[..., 0] ** 2))
    imgs = []
    for ch in range(channels):
        if modality.upper() == "CT":
            air, bg, org, les, noise = -1000.0, -20.0 + 10 * ch, 60.0 - 15 * ch, 140.0, 18.0
            x = np.full(size, air)
            x[body] = bg
            x[tube] = org + rng.uniform(-5, 5)
            x[organ] = org + rng.uniform(-10, 10)
            x[label == 2] = les + rng.uniform(-15, 15)
            x = x + rng.normal(0, noise, size)
        else:
            gain = rng.uniform(300, 900)
            bg, org, les = (0.35, 0.65, 1.0) if ch == 0 else (0.5, 0.3, 0.8)
            x = np.zeros(size)
            x[body] = bg
            x[tube] = org
            x[organ] = org
            x[label == 2] = les
            x = gain * (x * bias + rng.normal(0, 0.07, size))
        imgs.append(x.astype(np.float32))
    image = imgs[0] if channels == 1 else np.stack(imgs, -1)
    return image, label


def _save(path, arr, affine, dtype):
    import nibabel as nib
    img = nib.Nifti1Image(np.asarray(arr, dtype=dtype), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def make_demo_data(out, cases: int = 16, size=(48, 48, 48), seed: int = 0, layout: str = "decathlon",
                   modality: str = "MR", channels: int = 1, test_cases: int = 0, test_size=None) -> str:
    """Write the dataset (and `test_cases` extra cases of `test_size` in imagesTs/labelsTs) to `out`."""
    if layout not in ("decathlon", "nnunet"):
        raise ValueError("layout must be 'decathlon' or 'nnunet', got %r" % (layout,))
    if isinstance(cases, bool) or not isinstance(cases, int) or cases < 1:
        raise ValueError("cases must be an int >= 1, got %r" % (cases,))
    if channels < 1:
        raise ValueError("channels must be >= 1, got %r" % (channels,))
    if len(size) != 3 or min(int(s) for s in size[:2]) < 8 or int(size[2]) < 1:
        raise ValueError("size must be (X, Y, Z) with X, Y >= 8 and Z >= 1, got %s" % (list(size),))
    for d in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if test_cases else ()):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    spacing = (1.0, 1.0, 1.5) if modality.upper() == "CT" else (1.0, 1.0, 1.0)
    affine = np.diag(list(spacing) + [1.0])
    names = [("demo_%03d" % i) for i in range(cases + test_cases)]
    training = []
    for i, name in enumerate(names):
        test = i >= cases
        sz = tuple(test_size) if (test and test_size) else tuple(size)
        img, lab = make_case(i, sz, seed, modality, channels)
        idir, ldir = ("imagesTs", "labelsTs") if test else ("imagesTr", "labelsTr")
        if layout == "decathlon":
            _save(os.path.join(out, idir, name + ".nii.gz"), img, affine, np.float32)
            if not test:
                training.append({"image": "./imagesTr/%s.nii.gz" % name, "label": "./labelsTr/%s.nii.gz" % name})
        else:
            chans = [img] if channels == 1 else [img[..., k] for k in range(channels)]
            for k, a in enumerate(chans):
                _save(os.path.join(out, idir, "%s_%04d.nii.gz" % (name, k)), a, affine, np.float32)
        _save(os.path.join(out, ldir, name + ".nii.gz"), lab, affine, np.uint8)
    chan_names = {str(k): (modality.upper() if modality.upper() == "CT" else "MR%d" % k if channels > 1 else "MR")
                  for k in range(channels)}
    if layout == "decathlon":
        meta = {"name": "medconv_ext demo", "description": "synthetic organ and lesion volumes",
                "tensorImageSize": "3D" if channels == 1 else "4D", "modality": chan_names,
                "labels": {str(k): v for k, v in LABELS.items()}, "numTraining": cases, "numTest": test_cases,
                "training": training,
                "test": ["./imagesTs/%s.nii.gz" % n for n in names[cases:]]}
    else:
        meta = {"name": "medconv_ext demo", "channel_names": chan_names,
                "labels": {v: k for k, v in LABELS.items()}, "numTraining": cases, "file_ending": ".nii.gz"}
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return out


def add_parser(sub):
    d = sub.add_parser("make-demo-data", help="write a small synthetic labelled dataset (Decathlon layout)",
                       description=__doc__.split("\n\n")[0])
    a = d.add_argument
    a("dir", help="output folder (created)")
    a("--cases", type=int, default=16, help="training cases (default 16)")
    a("--size", type=int, nargs="+", default=[48], help="volume size: one int or X Y Z (default 48)")
    a("--test-cases", type=int, default=1, help="extra cases in imagesTs/labelsTs (default 1)")
    a("--test-size", type=int, nargs="+", default=[72], help="their size (default 72: larger than the training "
                                                              "cases and not a multiple of 16)")
    a("--layout", choices=("decathlon", "nnunet"), default="decathlon")
    a("--modality", choices=("MR", "CT"), default="MR")
    a("--channels", type=int, default=1)
    a("--seed", type=int, default=0)
    return d


def _size3(v, what):
    if len(v) == 1:
        return (v[0],) * 3
    if len(v) == 3:
        return tuple(v)
    raise ValueError("%s takes one int or three, got %s" % (what, v))


def main_from_args(args) -> int:
    try:
        make_demo_data(args.dir, args.cases, _size3(args.size, "--size"), args.seed, args.layout, args.modality,
                       args.channels, args.test_cases, _size3(args.test_size, "--test-size"))
    except (ValueError, OSError, ImportError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    print("wrote %s: %d training case(s)%s, %s layout" % (args.dir, args.cases, " + %d in imagesTs" % args.test_cases
                                                         if args.test_cases else "", args.layout), file=sys.stderr)
    return 0
