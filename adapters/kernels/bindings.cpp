// The Python module of loraplex's CPU kernels (one build, one import).
#include <torch/extension.h>

void bgmv_(torch::Tensor y, torch::Tensor x, torch::Tensor A, torch::Tensor Bt, torch::Tensor slots,
           torch::Tensor ranks);
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor bias);
torch::Tensor int8_linear_a8(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor bias,
                             int64_t block, const std::string& isa);
std::string int8_linear_a8_isa();

// Every kernel runs without the GIL (it touches no Python object): the prefill worker's long matmuls
// must not stop the engine thread's decode step, which needs the GIL between its own kernels.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using no_gil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("bgmv_", &bgmv_, no_gil(), "per-row LoRA delta added in place");
  m.def("int8_linear", &int8_linear, no_gil(), "weight-only int8 linear, batch-invariant per row");
  m.def("int8_linear_a8", &int8_linear_a8, no_gil(), "int8 weights x per-block int8 activations, batch-invariant per row");
  m.def("int8_linear_a8_isa", &int8_linear_a8_isa, "the ISA int8_linear_a8 uses on this CPU");
}
