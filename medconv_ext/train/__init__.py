"""Training examples. `python -m medconv_ext.train qsm ...` trains a QSM network on synthetic
data made from physics (qsm_data), with the QSMnet loss (losses), and reports PSNR, SSIM,
NMSE and HFEN (metrics) for the model and for TKD (loop). See docs/training.md."""
from .losses import QSMLoss, spatial_gradients  # noqa: F401
from .loop import QSMTrainConfig, evaluate, run_qsm  # noqa: F401
from .metrics import hfen, nmse, psnr, qsm_metrics, ssim3d  # noqa: F401
from .qsm_data import SyntheticQSM, dipole_convolve, dipole_kernel, random_phantom, tkd  # noqa: F401
