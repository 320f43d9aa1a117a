"""A second synthetic labelled dataset, unlike `make-demo-data`'s, to check the `seg --data` targets
on data the demo generator did not make: nnU-Net raw layout (or Decathlon with --layout decathlon),
CT-like Hounsfield units, anisotropic voxels (0.8 x 0.8 x 1.5 mm), non-cubic volumes whose sizes are
not multiples of 8, and other structures: label 1 "vessel" (a curved tube of varying radius, with
a branch), label 2 "nodule" (2-3 bright ellipsoids anywhere in the body, some touching the vessel),
over a body with fat (-100 HU) and soft tissue (40 HU) and calcified specks as distractors (label 0).

    python bench/make_seg_target_data.py DIR [--cases 16] [--size 40 44 36] [--test-size 72 80 66]
"""
import argparse
import json
import os
import sys

import numpy as np


def make_case(index, size, seed=0):
    rng = np.random.default_rng([seed, index, 104729])
    size = tuple(int(s) for s in size)
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij"), -1)
    u = (g - (np.array(size) - 1) / 2) / (np.array(size) / 2)
    body = (u[..., 0] / 0.96) ** 2 + (u[..., 1] / 0.9) ** 2 <= 1.0
    fat = body & ((u[..., 0] / 0.8) ** 2 + (u[..., 1] / 0.75) ** 2 > 1.0)
    x = np.full(size, -1000.0)
    x[body] = 40.0
    x[fat] = -100.0
    label = np.zeros(size, np.uint8)
    # vessel: a tube along a random smooth curve through the volume (z is the long axis), plus a branch
    t = np.linspace(-1.1, 1.1, 200)
    a = rng.uniform(-0.4, 0.4, 4)
    curve = np.stack([a[0] + 0.3 * np.sin(2 * t + a[1]), a[2] + 0.3 * np.cos(1.5 * t + a[3]), t], -1)
    b0 = int(rng.integers(60, 140))
    d = rng.normal(size=3)
    d[2] = 0
    d /= np.linalg.norm(d)
    branch = curve[b0] + np.linspace(0, 0.6, 60)[:, None] * d
    pts = np.concatenate([curve, branch])
    rad = np.concatenate([0.16 + 0.04 * np.sin(3 * t), np.full(60, 0.11)])
    for p, r in zip(pts[::2], rad[::2]):
        m = ((u - p) ** 2).sum(-1) <= r * r
        label[m & body] = 1
    x[label == 1] = 200.0 + rng.uniform(-20, 20)  # contrast-enhanced vessel
    # nodules: bright ellipsoids
    for _ in range(int(rng.integers(2, 4))):
        c = rng.uniform(-0.55, 0.55, 3)
        ax = rng.uniform(0.15, 0.24, 3)
        m = (((u - c) / ax) ** 2).sum(-1) <= 1.0
        label[m & body] = 2
    x[label == 2] = 110.0 + rng.uniform(-15, 15)
    # calcified specks (label 0), as bright as the vessel
    for _ in range(int(rng.integers(3, 7))):
        c = rng.uniform(-0.7, 0.7, 3)
        m = (((u - c) / 0.05) ** 2).sum(-1) <= 1.0
        x[m & body & (label == 0)] = 220.0
    x += rng.normal(0, 15.0, size)
    return x.astype(np.float32), label


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    p.add_argument("--cases", type=int, default=16)
    p.add_argument("--size", type=int, nargs=3, default=[40, 44, 36])
    p.add_argument("--test-size", type=int, nargs=3, default=[72, 80, 66])
    p.add_argument("--layout", choices=("nnunet", "decathlon"), default="nnunet")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import nibabel as nib
    aff = np.diag([0.8, 0.8, 1.5, 1.0])
    aff[:3, 3] = [-20.0, 15.0, 100.0]
    for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(a.dir, d), exist_ok=True)
    training = []
    for i in range(a.cases + 1):
        test = i == a.cases
        img, lab = make_case(i, a.test_size if test else a.size, a.seed)
        name = "vsl_%03d" % i
        idir, ldir = ("imagesTs", "labelsTs") if test else ("imagesTr", "labelsTr")
        iname = name + ("_0000" if a.layout == "nnunet" else "") + ".nii.gz"
        nib.save(nib.Nifti1Image(img, aff), os.path.join(a.dir, idir, iname))
        nib.save(nib.Nifti1Image(lab, aff), os.path.join(a.dir, ldir, name + ".nii.gz"))
        if not test:
            training.append({"image": "./imagesTr/" + iname, "label": "./labelsTr/%s.nii.gz" % name})
    labels = {"background": 0, "vessel": 1, "nodule": 2}
    if a.layout == "nnunet":
        meta = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": a.cases, "file_ending": ".nii.gz"}
    else:
        meta = {"modality": {"0": "CT"}, "labels": {str(v): k for k, v in labels.items()}, "numTraining": a.cases,
                "training": training}
    with open(os.path.join(a.dir, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print("wrote %s (%s layout, %d cases + 1 test case of %s)" % (a.dir, a.layout, a.cases, a.test_size),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
