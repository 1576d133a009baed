// Schemas of every C++/CUDA kernel of the engine. Kernels live in csrc/cpu/<op>.cpp
// (TORCH_LIBRARY_IMPL(engine, CPU, m)) and csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL(engine, CUDA, m)).
// Python wraps them as autograd-aware custom ops in engine/<op>.py; the `torch` backend is
// engine/reference.py. Every kernel takes fp32/bf16/fp16 inputs, accumulates in fp32, and checks
// its arguments with TORCH_CHECK_VALUE (a Python ValueError naming the argument).
#include <torch/library.h>

#ifdef ENGINE_PYTHON_MODULE
#include <Python.h>
// `import engine._C` loads the library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(engine, m) {
  // ---- token_logprobs (csrc/cpu/token_logprobs.cpp, csrc/cuda/token_logprobs.cu) ----

  // ---- grpo (csrc/cpu/grpo.cpp, csrc/cuda/grpo.cu) ----

  // ---- vision (csrc/cpu/vision.cpp, csrc/cuda/vision.cu) ----
}
