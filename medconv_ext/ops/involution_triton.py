"""Backend "triton" of involution: registers the Triton kernels of
medconv_ext.triton_kernels.involution under the registry op "involution". Filled in by the
GPU-kernel work (impl signature fn(x, weight, kernel_size, stride, padding, dilation))."""
