"""Training examples (see docs/training.md).

`python -m medconv_ext.train qsm ...` trains a QSM network on synthetic data made from physics
(qsm_data) and compares it with TKD (PSNR, SSIM, NMSE, HFEN: metrics); `python -m medconv_ext.train
seg ...` trains a 2D segmenter on synthetic shapes (seg_data) and compares its Dice with
thresholding. Both run on the shared loop (loop): checkpoints with exact resume, bf16 autocast,
DistributedDataParallel under torchrun."""
from .losses import QSMLoss, QSMMSELoss, spatial_gradients  # noqa: F401
from .loop import TrainConfig, run_training  # noqa: F401
from .metrics import hfen, nmse, psnr, qsm_metrics, ssim3d  # noqa: F401
from .qsm import QSMTrainConfig, TKDResidual, evaluate, run_qsm  # noqa: F401
from .qsm_data import SyntheticQSM, dipole_convolve, dipole_kernel, random_phantom, tkd  # noqa: F401
from .seg import SegTrainConfig, run_seg  # noqa: F401
from .seg_data import SyntheticShapes, dice, otsu_threshold  # noqa: F401
