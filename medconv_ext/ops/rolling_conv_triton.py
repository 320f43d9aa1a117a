"""Backend "triton" of rolling convolution: registers the Triton kernels of
medconv_ext.triton_kernels.rolling_conv. Filled in by the GPU-kernel work."""
