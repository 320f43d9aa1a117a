"""Labelled segmentation datasets on disk: the Medical Segmentation Decathlon layout and nnU-Net's
raw layout, told apart by their dataset.json.

Decathlon (also what MONAI's DecathlonDataset reads):
    DIR/dataset.json   {"labels": {"0": "background", "1": "liver", ...}, "modality": {"0": "CT"},
                        "training": [{"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"}, ...]}
    DIR/imagesTr/*.nii.gz  (X, Y, Z) or (X, Y, Z, C) for several channels
    DIR/labelsTr/*.nii.gz  (X, Y, Z) integer labels
nnU-Net raw (v2):
    DIR/dataset.json   {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                        "numTraining": N, "file_ending": ".nii.gz"}
    DIR/imagesTr/CASE_0000.nii.gz, CASE_0001.nii.gz, ...  (one file per channel)
    DIR/labelsTr/CASE.nii.gz

Every case is checked before training starts (`load_cases`): files exist and read, image and
label shapes and affines agree (channels too), and the label values are those of dataset.json;
any problem is one DatasetError (a ValueError) naming the file. 2D images are NIfTI files with two
spatial axes (or a third of size 1); they are handled as volumes of one slice.
"""
import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

LAYOUTS = ("decathlon", "nnunet")
_EXT = (".nii.gz", ".nii")


class DatasetError(ValueError):
    """A problem with a dataset on disk (names the file)."""


@dataclasses.dataclass
class Case:
    name: str
    images: List[str]          # one file (Decathlon, channels on the 4th axis) or one per channel (nnU-Net)
    label: str


@dataclasses.dataclass
class SegDataset:
    root: str
    layout: str                         # "decathlon" or "nnunet"
    labels: Dict[int, str]              # class index -> name (0: background)
    channel_names: List[str]
    cases: List[Case]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def foreground(self) -> List[int]:
        return [k for k in sorted(self.labels) if k != 0]


def _err(path, msg):
    return DatasetError("%s: %s" % (path, msg))


def _int_key(k, path, what):
    try:
        v = int(k)
    except (TypeError, ValueError):
        raise _err(path, "%s: label value %r is not an integer" % (what, k)) from None
    if isinstance(k, bool) or (isinstance(k, float) and k != v):
        raise _err(path, "%s: label value %r is not an integer" % (what, k))
    return v


def _check_labels(labels: Dict[int, str], path):
    vals = sorted(labels)
    if not vals:
        raise _err(path, "'labels' is empty")
    if vals != list(range(len(vals))):
        raise _err(path, "'labels' must number the classes 0, 1, ..., K-1 (0: background), got %s" % vals)
    if len(vals) < 2:
        raise _err(path, "'labels' has only the background; a segmentation dataset needs at least one foreground "
                         "label")


def _rel(root, p, path, what):
    if not isinstance(p, str) or not p:
        raise _err(path, "%s must be a file name, got %r" % (what, p))
    return os.path.normpath(os.path.join(root, p))


def read_dataset(root) -> SegDataset:
    """Parse DIR/dataset.json (layout detected from its keys) and list the cases."""
    root = os.path.abspath(str(root))
    path = os.path.join(root, "dataset.json")
    if not os.path.isdir(root):
        raise DatasetError("%s: no such dataset folder" % root)
    if not os.path.isfile(path):
        raise DatasetError("%s: no dataset.json (a Decathlon or nnU-Net raw dataset folder has one)" % path)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(path, "cannot read it as JSON (%s)" % e) from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise _err(path, "needs a 'labels' entry")
    raw = meta["labels"]
    if not isinstance(raw, dict):
        raise _err(path, "'labels' must be a dict, got %s" % type(raw).__name__)
    if "channel_names" in meta:
        layout = "nnunet"
        labels = {}
        for name, v in raw.items():
            if isinstance(v, (list, tuple)):
                raise _err(path, "label %r is a region (a list of values); region-based training is not supported"
                           % name)
            labels[_int_key(v, path, "labels[%r]" % name)] = str(name)
        ch = meta["channel_names"]
        if not isinstance(ch, dict) or not ch:
            raise _err(path, "'channel_names' must be a non-empty dict {\"0\": \"CT\", ...}")
        chans = [str(ch[k]) for k in sorted(ch, key=lambda k: _int_key(k, path, "channel_names"))]
        if sorted(_int_key(k, path, "channel_names") for k in ch) != list(range(len(chans))):
            raise _err(path, "'channel_names' must be numbered 0, 1, ..., got %s" % sorted(ch))
        ending = meta.get("file_ending", ".nii.gz")
        if ending not in _EXT:
            raise _err(path, "file_ending %r is not supported (NIfTI only: .nii.gz, .nii)" % (ending,))
        _check_labels(labels, path)
        lab_dir = os.path.join(root, "labelsTr")
        if not os.path.isdir(lab_dir):
            raise DatasetError("%s: no labelsTr folder" % lab_dir)
        names = sorted(f[:-len(ending)] for f in os.listdir(lab_dir) if f.endswith(ending) and not f.startswith("."))
        img_dir = os.path.join(root, "imagesTr")
        if not os.path.isdir(img_dir):
            raise DatasetError("%s: no imagesTr folder" % img_dir)
        # every case of imagesTr must have its label: a case is a CASE_0000 image
        img_cases = sorted(f[:-len("_0000" + ending)] for f in os.listdir(img_dir) if f.endswith("_0000" + ending))
        for c in img_cases:
            if c not in names:
                raise DatasetError("%s: missing label file of case %s (imagesTr has %s)"
                                   % (os.path.join(lab_dir, c + ending), c, c + "_0000" + ending))
        cases = [Case(c, [os.path.join(img_dir, "%s_%04d%s" % (c, k, ending)) for k in range(len(chans))],
                      os.path.join(lab_dir, c + ending)) for c in names]
        n = meta.get("numTraining")
        if isinstance(n, int) and n != len(cases):
            raise _err(path, "numTraining is %d but labelsTr has %d cases" % (n, len(cases)))
    else:
        layout = "decathlon"
        labels = {_int_key(k, path, "labels"): str(v) for k, v in raw.items()}
        _check_labels(labels, path)
        mod = meta.get("modality", meta.get("channel_names", {"0": "image"}))
        if not isinstance(mod, dict) or not mod:
            raise _err(path, "'modality' must be a non-empty dict {\"0\": \"CT\", ...}")
        chans = [str(mod[k]) for k in sorted(mod, key=lambda k: _int_key(k, path, "modality"))]
        tr = meta.get("training")
        if not isinstance(tr, list):
            raise _err(path, "needs a 'training' list of {\"image\": ..., \"label\": ...} pairs (Decathlon layout) "
                             "or 'channel_names' (nnU-Net raw layout)")
        cases = []
        for i, pair in enumerate(tr):
            if not isinstance(pair, dict) or "image" not in pair or "label" not in pair:
                raise _err(path, "training[%d] must be {\"image\": ..., \"label\": ...}, got %r" % (i, pair))
            img = _rel(root, pair["image"], path, "training[%d].image" % i)
            lab = _rel(root, pair["label"], path, "training[%d].label" % i)
            base = os.path.basename(img)
            name = next((base[:-len(e)] for e in _EXT if base.endswith(e)), base)
            cases.append(Case(name, [img], lab))
    if not cases:
        raise _err(path, "the dataset has no training cases (empty 'training' list / labelsTr)")
    seen = set()
    for c in cases:
        if c.name in seen:
            raise _err(path, "case name %r appears twice" % c.name)
        seen.add(c.name)
    return SegDataset(root, layout, dict(sorted(labels.items())), chans, cases)


# ------------------------------------------------------------------ reading cases
def _read_nifti(path, what):
    """(array with spatial axes first, (X, Y, Z[, C]), affine)."""
    if not os.path.isfile(path):
        raise DatasetError("%s: missing %s file" % (path, what))
    try:
        import nibabel as nib
    except ImportError:
        raise ImportError("reading NIfTI datasets needs nibabel: pip install nibabel (or 'medconv_ext[io]')") from None
    from ..tiling import io as tio
    try:
        fmt = tio.detect_format(path)
        if fmt not in ("nii", "nii.gz"):
            raise ValueError("not a NIfTI file name (.nii, .nii.gz)")
        img = nib.load(path)
        arr = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except DatasetError:
        raise
    except Exception as e:  # nibabel raises many kinds for damaged files
        raise DatasetError("%s: unreadable %s file (%s: %s)" % (path, what, type(e).__name__, e)) from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim not in (3, 4):
        raise DatasetError("%s: %s has shape %s; expected (X, Y), (X, Y, Z) or (X, Y, Z, C)"
                           % (path, what, arr.shape))
    return arr, affine


def _same_affine(a, b) -> bool:
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=1e-3)


@dataclasses.dataclass
class LoadedCase:
    name: str
    image: np.ndarray      # float32 (C, X, Y, Z), raw intensities
    label: np.ndarray      # uint8/int16 (X, Y, Z) class indices
    affine: np.ndarray


def load_case(ds: SegDataset, case: Case) -> LoadedCase:
    lab, laff = _read_nifti(case.label, "label")
    if lab.ndim == 4:
        if lab.shape[3] != 1:
            raise DatasetError("%s: label has shape %s; expected one channel of integer labels"
                               % (case.label, lab.shape))
        lab = lab[..., 0]
    chans = []
    for p in case.images:
        a, aff = _read_nifti(p, "image")
        if a.ndim == 3:
            a = a[None]
        else:
            a = np.moveaxis(a, 3, 0)
        if a.shape[1:] != lab.shape:
            raise DatasetError("%s: image shape %s does not match its label %s of shape %s"
                               % (p, tuple(a.shape[1:]), case.label, tuple(lab.shape)))
        if not _same_affine(aff, laff):
            raise DatasetError("%s: image affine differs from that of its label %s:\n%s\nvs\n%s"
                               % (p, case.label, np.round(aff, 4), np.round(laff, 4)))
        chans.append(a.astype(np.float32))
    image = np.concatenate(chans, 0)
    if image.shape[0] != len(ds.channel_names):
        raise DatasetError("%s: %d image channel(s), dataset.json names %d (%s)"
                           % (case.images[0], image.shape[0], len(ds.channel_names), ", ".join(ds.channel_names)))
    if not np.all(np.isfinite(image)):
        raise DatasetError("%s: the image has NaN or infinite voxels" % case.images[0])
    labf = np.asarray(lab)
    if labf.dtype.kind == "f":
        if not np.all(np.isfinite(labf)) or np.any(labf != np.round(labf)):
            raise DatasetError("%s: label values must be integers" % case.label)
    vals = np.unique(labf).astype(np.int64)
    bad = [int(v) for v in vals if int(v) not in ds.labels]
    if bad:
        raise DatasetError("%s: label values %s are not in dataset.json's labels %s"
                           % (case.label, bad, sorted(ds.labels)))
    dt = np.uint8 if ds.num_classes <= 256 else np.int16
    return LoadedCase(case.name, image, labf.astype(dt), laff)


def load_cases(ds: SegDataset, names: Optional[Sequence[str]] = None, log=None) -> List[LoadedCase]:
    """Read and check the cases (all, or those named), in dataset order."""
    sel = ds.cases if names is None else [c for c in ds.cases if c.name in set(names)]
    out = []
    for c in sel:
        out.append(load_case(ds, c))
    if log is not None:
        log("read %d case(s) of %s (%s layout)" % (len(out), ds.root, ds.layout))
    return out


def split_cases(ds: SegDataset, val_cases: Optional[str], val_size: Optional[int],
                seed: int) -> Tuple[List[str], List[str]]:
    """(training names, held-out names). val_cases: comma-separated names (held out as given); else
    val_size cases (None: 20%, at least 1 when the dataset has 2 or more) drawn with `seed`."""
    names = [c.name for c in ds.cases]
    if val_cases:
        want = [v.strip() for v in str(val_cases).split(",") if v.strip()]
        unknown = [v for v in want if v not in names]
        if unknown:
            raise DatasetError("--val-cases: %s not among the dataset's cases (%s%s)"
                               % (", ".join(unknown), ", ".join(names[:8]), ", ..." if len(names) > 8 else ""))
        val = want
    else:
        n = len(names)
        k = int(round(0.2 * n)) if val_size is None else int(val_size)
        if val_size is None and n >= 2:
            k = max(1, k)
        if k >= n:
            raise DatasetError("%s: %d held-out case(s) asked for but the dataset has only %d; at least one case must "
                               "remain for training" % (ds.root, k, n))
        rng = np.random.default_rng(seed)
        val = [names[i] for i in sorted(rng.permutation(n)[:k])]
    train = [v for v in names if v not in set(val)]
    if not train:
        raise DatasetError("%s: no training case left after holding out %s" % (ds.root, ", ".join(val)))
    return train, val
