import os
import sys

import torch

# Triton kernels run on CPU tensors in interpreter mode when no GPU is present. triton.jit
# reads TRITON_INTERPRET when a kernel is defined, so this must happen before any test module
# imports medconv_ext.triton_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The published Rolling-Filters checkpoints (segment.pth, recon.pth; docs/data.md) are not part of
# the repository. MEDCONV_DATA_DIR names the folder that holds them; the tests that need them skip
# without it, with a reason that names the variable.
DATA_ENV = "MEDCONV_DATA_DIR"
DATA_DIR = os.environ.get(DATA_ENV, "").strip()


def data_file(name):
    """Path of a published checkpoint file in MEDCONV_DATA_DIR, or None when the variable is unset."""
    return os.path.join(DATA_DIR, name) if DATA_DIR else None


def data_missing(*names):
    """Why the named checkpoint files cannot be used (a skip reason), or None when all are there."""
    if not DATA_DIR:
        return ("published Rolling-Filters checkpoints not configured: set %s to the folder with %s "
                "(see docs/data.md)" % (DATA_ENV, " and ".join(names)))
    missing = [n for n in names if not os.path.isfile(os.path.join(DATA_DIR, n))]
    if missing:
        return "%s=%s has no %s (see docs/data.md)" % (DATA_ENV, DATA_DIR, ", ".join(missing))
    return None


def needs_data(*names):
    """Marker: skip the test unless MEDCONV_DATA_DIR holds the named checkpoint files."""
    why = data_missing(*names)
    return pytest.mark.skipif(why is not None, reason=why or "")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
