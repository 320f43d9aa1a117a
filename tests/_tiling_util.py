"""Helpers for the tiling tests: small networks, integer-valued weights, an exactness guard."""
import torch
from torch import nn
import torch.nn.functional as F

EXACT_LIMIT = 2.0 ** 40  # activations below this: every conv sum of integers stays exact in float64


def integer_weights_(model: nn.Module, seed: int = 0, zero_prob: float = 0.5) -> nn.Module:
    """Integer weights in {-1, 0, 1} (zero with probability zero_prob), biases in {-2..2};
    BatchNorm: integer mean, var 1, eps 0, weight in {1, 2}: every activation stays an integer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eps = 0.0
                m.running_mean.copy_(torch.randint(-2, 3, m.running_mean.shape, generator=g))
                m.running_var.fill_(1.0)
                m.weight.copy_(torch.randint(1, 3, m.weight.shape, generator=g))
                m.bias.copy_(torch.randint(-2, 3, m.bias.shape, generator=g))
                continue
            for name, p in m.named_parameters(recurse=False):
                if name == "bias":
                    p.copy_(torch.randint(-2, 3, p.shape, generator=g))
                else:
                    w = torch.randint(-1, 2, p.shape, generator=g).to(p.dtype)
                    w[torch.rand(p.shape, generator=g) < zero_prob] = 0
                    p.copy_(w)
    return model


def integer_image(shape, seed=1, high=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, shape, generator=g).to(dtype)


def assert_exact_regime(model: nn.Module, x: torch.Tensor):
    """Runs the model and checks every module output is integer-valued and below EXACT_LIMIT, so
    float64 arithmetic is exact whatever the summation order (else the bit-identity test would be
    meaningless). Returns the output."""
    bad = []

    def hook(mod, inp, out):
        if isinstance(out, torch.Tensor) and out.numel():
            if not torch.equal(out, out.round()) or out.abs().max() >= EXACT_LIMIT:
                bad.append((type(mod).__name__, float(out.abs().max())))

    hs = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in hs:
            h.remove()
    assert not bad, "test setup leaves the exact-integer regime: %s" % bad[:3]
    return y


def dilated_net(dims=2, cin=1, cout=2):
    """Padded stride-1 network with a dilated 5x5 conv: receptive radius 1 + 4 + 1 = 6."""
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(conv(cin, 3, 3, padding=1), nn.ReLU(), conv(3, 3, 5, padding=4, dilation=2), nn.ReLU(),
                         conv(3, cout, 3, padding=1))


class UNet(nn.Module):
    """Small U-Net: `levels` max-pool down-samplings (align 2**levels), padded 3x3 convs + BatchNorm +
    ReLU, transposed-conv up-sampling, skip concatenation."""

    def __init__(self, cin=1, cout=2, base=2, levels=2, dims=2):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        convt = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)

        def block(a, b):
            return nn.Sequential(conv(a, b, 3, padding=1), bn(b), nn.ReLU())

        chans = [base * 2 ** i for i in range(levels + 1)]
        self.enc = nn.ModuleList([block(cin if i == 0 else chans[i - 1], chans[i]) for i in range(levels)])
        self.mid = block(chans[levels - 1], chans[levels])
        self.up = nn.ModuleList([convt(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(levels))])
        self.dec = nn.ModuleList([block(2 * chans[i], chans[i]) for i in reversed(range(levels))])
        self.out = conv(chans[0], cout, 1)

    def forward(self, x):
        skips = []
        for e in self.enc:
            x = e(x)
            skips.append(x)
            x = self.pool(x)
        x = self.mid(x)
        for u, d in zip(self.up, self.dec):
            x = d(torch.cat([u(x), skips.pop()], 1))
        return self.out(x)


def full_valid(model, x, margin, pad_mode="constant"):
    """Full-image inference of a valid network on the image padded once by the margin."""
    pads = []
    for m in reversed(margin):
        pads += [m, m]
    with torch.no_grad():
        return model(F.pad(x, pads, mode=pad_mode))
