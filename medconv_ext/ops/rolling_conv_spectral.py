"""Backend "spectral" of rolling convolution (DESIGN.md §1): channel rFFT, per-frequency
depthwise convolution, inverse rFFT. Filled in by the spectral-algorithm work."""
