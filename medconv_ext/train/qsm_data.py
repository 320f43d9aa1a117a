"""Synthetic QSM data from physics, made on the fly.

Conventions (used by the data, the loss, TKD and the tests alike):
  * a volume is a tensor (..., X, Y, Z): the last three axes are space, the main field B0
    points along the last axis (z) unless `b0_dir` says otherwise; voxel sizes in mm.
  * susceptibility `chi` and the local field are in ppm (the field as a fraction of B0).
  * dipole kernel in k-space  D(k) = 1/3 - (k . b0)^2 / |k|^2,  D(0) = 0.
    This is the Lorentz-corrected local field: the field inside a uniformly magnetised
    sphere is 0 and outside it is the dipole pattern chi * a^3 / 3 * (3 cos^2(theta) - 1) / r^3.
  * field = ifft(D * fft(chi)). With pad=True (the default) the volume is zero-padded to
    twice its size first, so the field is that of an isolated object (no wrap-around from
    the periodic FFT); pad=False gives the periodic (circular) convolution.

Phantoms: random ellipsoids (random centre, semi-axes, orientation and value) painted in
random order over a zero background, then vessel-like tubes (curved, random radius,
paramagnetic). Every sample is a pure function of (seed, stream, index): the training
batch of step s holds samples s * batch_size + i of stream "train", the held-out set holds
samples 0..n-1 of stream "val" (another seed), so a resumed run sees exactly the data the
uninterrupted run would have seen, with no data-loader state to save.
"""
import hashlib
import math
import struct
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

Vec3 = Tuple[float, float, float]


# --------------------------------------------------------------------------------------
# dipole kernel and the forward model
# --------------------------------------------------------------------------------------
def _check_vec3(v, name, positive=False):
    try:
        vals = tuple(float(a) for a in v)
    except TypeError:
        raise TypeError("%s must be a sequence of 3 numbers, got %r" % (name, v)) from None
    if len(vals) != 3 or not all(math.isfinite(a) for a in vals):
        raise ValueError("%s must be 3 finite numbers, got %r" % (name, v))
    if positive and min(vals) <= 0:
        raise ValueError("%s must be positive, got %r" % (name, v))
    return vals


def _b0_unit(b0_dir) -> Vec3:
    b = _check_vec3(b0_dir, "b0_dir")
    n = math.sqrt(sum(a * a for a in b))
    if n == 0:
        raise ValueError("b0_dir must be a non-zero vector, got %r" % (b0_dir,))
    return tuple(a / n for a in b)


_KERNEL_CACHE: Dict[tuple, torch.Tensor] = {}


def dipole_kernel(shape: Sequence[int], voxel_size=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), *,
                  half: bool = False, device=None, dtype=torch.float32) -> torch.Tensor:
    """D(k) = 1/3 - (k . b0)^2 / |k|^2 with D(0) = 0 on the DFT grid of `shape` (X, Y, Z).
    half=True returns the rfftn layout (X, Y, Z // 2 + 1)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError("dipole_kernel: shape must be 3 positive ints (X, Y, Z), got %r" % (shape,))
    vs = _check_vec3(voxel_size, "voxel_size", positive=True)
    b = _b0_unit(b0_dir)
    key = (shape, vs, b, half, str(device), dtype)
    d = _KERNEL_CACHE.get(key)
    if d is None:
        axes = [torch.fft.fftfreq(shape[0], d=vs[0], dtype=torch.float64),
                torch.fft.fftfreq(shape[1], d=vs[1], dtype=torch.float64),
                (torch.fft.rfftfreq if half else torch.fft.fftfreq)(shape[2], d=vs[2], dtype=torch.float64)]
        kx, ky, kz = torch.meshgrid(*axes, indexing="ij")
        k2 = kx * kx + ky * ky + kz * kz
        kb = kx * b[0] + ky * b[1] + kz * b[2]
        d = 1.0 / 3.0 - kb * kb / torch.where(k2 == 0, torch.ones_like(k2), k2)
        d[0, 0, 0] = 0.0
        d = d.to(device=device, dtype=dtype)
        if len(_KERNEL_CACHE) > 32:
            _KERNEL_CACHE.clear()
        _KERNEL_CACHE[key] = d
    return d


def _check_volume(x, name, fn):
    if not isinstance(x, torch.Tensor):
        raise TypeError("%s: %s must be a torch.Tensor, got %s" % (fn, name, type(x).__name__))
    if x.dim() < 3:
        raise ValueError("%s: %s must have at least 3 dims (..., X, Y, Z), got shape %s" % (fn, name, tuple(x.shape)))
    if not x.is_floating_point():
        raise TypeError("%s: %s must be a floating-point tensor, got %s" % (fn, name, x.dtype))


def _kspace_filter(x: torch.Tensor, kernel_fn, pad: bool) -> torch.Tensor:
    """Real filter applied in k-space over the last 3 axes, in float32 at least (FFTs in
    half precision are not supported on the CPU and lose too much accuracy)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(work)
    size = tuple(xs.shape[-3:])
    if pad:
        xs = F.pad(xs, (0, size[2], 0, size[1], 0, size[0]))
    full = tuple(xs.shape[-3:])
    k = kernel_fn(full, xs.device, work)
    y = torch.fft.irfftn(torch.fft.rfftn(xs, dim=(-3, -2, -1)) * k, s=full, dim=(-3, -2, -1))
    if pad:
        y = y[..., :size[0], :size[1], :size[2]]
    return y.to(x.dtype)


def dipole_convolve(chi: torch.Tensor, voxel_size=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0),
                    pad: bool = True) -> torch.Tensor:
    """Local field (ppm) of susceptibility `chi` (ppm), (..., X, Y, Z): ifft(D * fft(chi))."""
    _check_volume(chi, "chi", "dipole_convolve")
    return _kspace_filter(
        chi, lambda s, dev, dt: dipole_kernel(s, voxel_size, b0_dir, half=True, device=dev, dtype=dt), pad)


def tkd(field: torch.Tensor, threshold: float = 0.19, voxel_size=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0),
        pad: bool = True) -> torch.Tensor:
    """Thresholded k-space division (Shmueli et al. 2009): chi = ifft(fft(field) / D_t) with
    D_t = D where |D| > threshold and sign(D) * threshold elsewhere (0 where D = 0, so k = 0 and
    the magic-angle cone are left out). No correction factor is applied."""
    _check_volume(field, "field", "tkd")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 2.0 / 3.0:
        raise ValueError("tkd: threshold must be a number in (0, 2/3] (|D| <= 2/3), got %r" % (threshold,))

    def inv(s, dev, dt):
        d = dipole_kernel(s, voxel_size, b0_dir, half=True, device=dev, dtype=dt)
        big = d.abs() > threshold
        return torch.where(big, 1.0 / torch.where(big, d, torch.ones_like(d)), torch.sign(d) / threshold)
    return _kspace_filter(field, inv, pad)


# --------------------------------------------------------------------------------------
# phantoms
# --------------------------------------------------------------------------------------
def sample_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed that depends only on (seed, stream, index), the same on every platform."""
    h = hashlib.blake2b(struct.pack("<qq", int(seed), int(index)) + stream.encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def _grid(shape, device, dtype):
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (X, Y, Z, 3), voxel centres


def _random_rotation(g: torch.Generator) -> torch.Tensor:
    q = torch.randn(4, generator=g, dtype=torch.float64)
    q = q / q.norm()
    w, x, y, z = q.tolist()
    return torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]], dtype=torch.float64)


def ellipsoid_mask(shape, center, semi_axes, rotation=None, *, supersample: int = 1, device=None,
                   dtype=torch.float32) -> torch.Tensor:
    """Occupancy of an ellipsoid on the voxel grid (voxel centres at integer coordinates):
    1 inside, 0 outside; with supersample=s each voxel is split into s^3 sub-voxels and the
    occupied fraction is returned (partial volume)."""
    if supersample < 1:
        raise ValueError("ellipsoid_mask: supersample must be >= 1, got %r" % (supersample,))
    c = torch.tensor(center, dtype=torch.float64).to(device=device, dtype=dtype)
    a = torch.tensor(semi_axes, dtype=torch.float64).to(device=device, dtype=dtype)
    r = (torch.eye(3, dtype=torch.float64) if rotation is None else rotation).to(device=device, dtype=dtype)
    grid = _grid(shape, device, dtype)
    out = torch.zeros(tuple(shape), device=device, dtype=dtype)
    offs = [(i + 0.5) / supersample - 0.5 for i in range(supersample)]
    for ox in offs:
        for oy in offs:
            for oz in offs:
                p = (grid + torch.tensor([ox, oy, oz], device=device, dtype=dtype) - c) @ r  # body frame
                out += (((p / a) ** 2).sum(-1) <= 1).to(dtype)
    return out / supersample ** 3


def _box(lo, hi, shape):
    """Index slices of the voxels with lo <= coordinate <= hi (per axis), or None if empty."""
    sl = []
    for a in range(3):
        i0 = max(0, int(math.ceil(lo[a])))
        i1 = min(shape[a], int(math.floor(hi[a])) + 1)
        if i1 <= i0:
            return None
        sl.append(slice(i0, i1))
    return tuple(sl)


def _paint_ellipsoid(chi, grid, center, axes, rot, value):
    # only the bounding box of the rotated ellipsoid is evaluated (half-extent along axis i:
    # sqrt(sum_j (R_ij a_j)^2)), which keeps 64^3 phantoms cheap on the CPU
    half = ((rot * axes.unsqueeze(0)) ** 2).sum(1).sqrt()
    box = _box((center - half).tolist(), (center + half).tolist(), chi.shape)
    if box is None:
        return
    c = center.to(device=chi.device, dtype=chi.dtype)
    p = (grid[box] - c) @ rot.to(device=chi.device, dtype=chi.dtype)  # body frame
    inside = ((p / axes.to(device=chi.device, dtype=chi.dtype)) ** 2).sum(-1) <= 1
    chi[box] = torch.where(inside, torch.full_like(inside, value, dtype=chi.dtype), chi[box])


def _paint_tube(chi, grid, points, radius, value):
    """Voxels within `radius` of the polyline through `points` (S+1, 3), segment by segment."""
    for a, b in zip(points[:-1], points[1:]):
        box = _box((torch.minimum(a, b) - radius).tolist(), (torch.maximum(a, b) + radius).tolist(), chi.shape)
        if box is None:
            continue
        a_, b_ = a.to(device=chi.device, dtype=chi.dtype), b.to(device=chi.device, dtype=chi.dtype)
        ab = b_ - a_
        p = grid[box]
        t = (((p - a_) * ab).sum(-1) / (ab * ab).sum().clamp_min(1e-12)).clamp(0, 1)
        d2 = ((p - a_ - t.unsqueeze(-1) * ab) ** 2).sum(-1)
        chi[box] = torch.where(d2 <= radius * radius, torch.full_like(d2, value), chi[box])


def random_phantom(shape, g: torch.Generator, *, n_ellipsoids=(4, 12), n_vessels=(1, 4),
                   ellipsoid_chi=(-0.10, 0.20), vessel_chi=(0.10, 0.45), axis_frac=(0.06, 0.35),
                   vessel_radius=(0.6, 2.5), device=None, dtype=torch.float32) -> torch.Tensor:
    """One susceptibility phantom (X, Y, Z) in ppm: ellipsoids painted in random order over a
    zero background (piecewise constant), then vessel-like tubes along quadratic Bezier curves.
    Random numbers come from the CPU generator `g` (so a seed gives the same phantom on every
    device); rasterisation runs on `device`."""
    shape = tuple(int(n) for n in shape)

    def uni(lo, hi, n=None):
        u = torch.rand(n or 1, generator=g, dtype=torch.float64)
        return (lo + (hi - lo) * u) if n else float(lo + (hi - lo) * u)

    def randint(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    grid = _grid(shape, device, dtype)
    n_min = min(shape)
    chi = torch.zeros(shape, device=device, dtype=dtype)
    ext = torch.tensor(shape, dtype=torch.float64)
    for _ in range(randint(*n_ellipsoids)):
        center = torch.rand(3, generator=g, dtype=torch.float64) * ext - 0.5
        axes = (uni(axis_frac[0], axis_frac[1], 3) * n_min).clamp_min(0.75)
        rot = _random_rotation(g)
        _paint_ellipsoid(chi, grid, center, axes, rot, uni(*ellipsoid_chi))
    for _ in range(randint(*n_vessels)):
        # quadratic Bezier curve through (and around) the volume, as a 12-segment polyline
        ctrl = (torch.rand(3, 3, generator=g, dtype=torch.float64) * 1.4 - 0.2) * ext
        t = torch.linspace(0, 1, 13, dtype=torch.float64).unsqueeze(1)
        pts = (1 - t) ** 2 * ctrl[0] + 2 * (1 - t) * t * ctrl[1] + t ** 2 * ctrl[2]
        radius = uni(*vessel_radius)
        _paint_tube(chi, grid, pts, radius, uni(*vessel_chi))
    return chi


class SyntheticQSM:
    """Deterministic stream of synthetic QSM samples (field, chi), each (1, X, Y, Z) in ppm.

    sample(i) depends only on (seed, stream, i); batch(step, b) returns samples
    step*b .. step*b+b-1 stacked to (b, 1, X, Y, Z). `noise_std` (ppm) is white Gaussian noise
    added to the field; `clean_field(chi)` gives the noise-free field of the same forward model.
    """

    def __init__(self, patch=32, *, seed: int = 0, stream: str = "train", noise_std: float = 0.002,
                 voxel_size=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), pad: bool = True, device="cpu",
                 dtype=torch.float32, **phantom_kw):
        if isinstance(patch, int) and not isinstance(patch, bool):
            patch = (patch,) * 3
        patch = tuple(patch)
        if len(patch) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 4 for n in patch):
            raise ValueError("SyntheticQSM: patch must be an int >= 4 or 3 such ints, got %r" % (patch,))
        if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError("SyntheticQSM: noise_std must be a finite number >= 0, got %r" % (noise_std,))
        self.patch = patch
        self.seed = int(seed)
        self.stream = str(stream)
        self.noise_std = float(noise_std)
        self.voxel_size = _check_vec3(voxel_size, "voxel_size", positive=True)
        self.b0_dir = _b0_unit(b0_dir)
        self.pad = bool(pad)
        self.device = torch.device(device)
        self.dtype = dtype
        self.phantom_kw = phantom_kw

    def clean_field(self, chi: torch.Tensor) -> torch.Tensor:
        return dipole_convolve(chi, self.voxel_size, self.b0_dir, self.pad)

    def tkd(self, field: torch.Tensor, threshold: float = 0.19) -> torch.Tensor:
        return tkd(field, threshold, self.voxel_size, self.b0_dir, self.pad)

    def sample(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.stream, index))
        chi = random_phantom(self.patch, g, device=self.device, dtype=self.dtype, **self.phantom_kw)
        field = self.clean_field(chi)
        if self.noise_std > 0:
            noise = torch.randn(self.patch, generator=g, dtype=torch.float32) * self.noise_std
            field = field + noise.to(device=self.device, dtype=self.dtype)
        return field.unsqueeze(0), chi.unsqueeze(0)

    def batch(self, step: int, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.sample(step * batch_size + i) for i in range(batch_size)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
