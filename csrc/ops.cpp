// Operator schemas of the `medconv` library: each op is defined once, here.
// Kernels live in csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>.cu (CUDA); argument checks,
// fake kernels, autograd and backend choice live in medconv_ext/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(medconv, m) {
  // ---- rolling convolution (docs/design.md §1) ---------------------------------------------
  // x (N, C_in, *S), weight = base (n_base, C_in, *k), out (N, n_rolls * n_base, *S_out);
  // output channel o = r * n_base + b uses W[o, c] = weight[b, (c - r) mod C_in].
  m.def("rolling_conv(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
        "int[] dilation, int n_rolls) -> Tensor");
  m.def("rolling_conv_grad_input(Tensor grad_out, Tensor weight, int[] input_size, int[] stride, "
        "int[] padding, int[] dilation, int n_rolls) -> Tensor");
  m.def("rolling_conv_grad_weight(Tensor grad_out, Tensor x, int[] weight_size, int[] stride, "
        "int[] padding, int[] dilation, int n_rolls) -> Tensor");
  // Transposed rolling convolution: weight (C_in, n_base, *k), W_t[c, o] = weight[(c - r) mod C_in, b]
  // for o = r * n_base + b, then an ordinary transposed convolution with W_t.
  m.def("rolling_conv_transpose(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
        "int[] output_padding, int[] dilation, int n_rolls) -> Tensor");
  m.def("rolling_conv_transpose_grad_input(Tensor grad_out, Tensor weight, int[] input_size, "
        "int[] stride, int[] padding, int[] dilation, int n_rolls) -> Tensor");
  m.def("rolling_conv_transpose_grad_weight(Tensor grad_out, Tensor x, int[] weight_size, "
        "int[] stride, int[] padding, int[] dilation, int n_rolls) -> Tensor");

  // ---- spectral rolling convolution (fused CPU kernel; same definition as above) -------
  // Channel DFT -> per-frequency complex depthwise conv -> inverse DFT of the n_rolls kept rows,
  // with an optional epilogue y = relu?((conv + bias) * scale + shift) per output channel
  // (scale/shift None: 1/0). The result has the input's memory format (channels-last in, channels-last out).
  m.def("rolling_conv_spectral(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, "
        "bool relu, int[] stride, int[] padding, int[] dilation, int n_rolls) -> Tensor");
  // rolling_conv_spectral of cat([x, x2], 1), both read in place (a UNet decoder: no concatenated copy)
  m.def("rolling_conv_spectral_cat(Tensor x, Tensor x2, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, "
        "bool relu, int[] stride, int[] padding, int[] dilation, int n_rolls) -> Tensor");
  m.def("rolling_conv_spectral_cat_grad_weight(Tensor grad_out, Tensor x, Tensor x2, int[] weight_size, "
        "int[] stride, int[] padding, int[] dilation, int n_rolls) -> Tensor");
  m.def("rolling_conv_spectral_grad_input(Tensor grad_out, Tensor weight, int[] input_size, int[] stride, "
        "int[] padding, int[] dilation, int n_rolls) -> Tensor");
  m.def("rolling_conv_spectral_grad_weight(Tensor grad_out, Tensor x, int[] weight_size, int[] stride, "
        "int[] padding, int[] dilation, int n_rolls) -> Tensor");
  m.def("rolling_conv_transpose_spectral(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, "
        "bool relu, int[] stride, int[] padding, int[] output_padding, int[] dilation, int n_rolls) -> Tensor");
  m.def("rolling_conv_transpose_spectral_grad_input(Tensor grad_out, Tensor weight, int[] input_size, "
        "int[] stride, int[] padding, int[] dilation, int n_rolls) -> Tensor");
  m.def("rolling_conv_transpose_spectral_grad_weight(Tensor grad_out, Tensor x, int[] weight_size, "
        "int[] stride, int[] padding, int[] dilation, int n_rolls) -> Tensor");

  // ---- involution (docs/design.md §2) -------------------------------------------------------
  // x (N, C, *S), weight (N, G, *K, *S_out), channel c uses group c // (C / G).
  m.def("involution(Tensor x, Tensor weight, int[] kernel_size, int[] stride, int[] padding, "
        "int[] dilation) -> Tensor");
  m.def("involution_grad_input(Tensor grad_out, Tensor weight, int[] input_size, int[] kernel_size, "
        "int[] stride, int[] padding, int[] dilation) -> Tensor");
  // `groups` (G) cannot be recovered from grad_out and x, so grad_weight takes it explicitly.
  m.def("involution_grad_weight(Tensor grad_out, Tensor x, int[] kernel_size, int[] stride, "
        "int[] padding, int[] dilation, int groups) -> Tensor");
}

// The Python module only has to exist so that importing medconv_ext._C loads the library
// (and with it the registrations above); it also says what was compiled in. Plain CPython
// API rather than torch/extension.h: that header (pybind11 + the whole C++ API) doubles the
// compile time of every file that includes it.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "medconv_ext compiled kernels (registered as torch.ops.medconv.*)", -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef MEDCONV_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
