// `import fastgrpo._C_cuda` loads this library, whose static registrations (the *_bindings.cpp files) add the CUDA
// implementations of the ops that fastgrpo._C declares. A module of its own, so that the CPU ops never depend
// on the CUDA runtime: where libcudart cannot be loaded, only backend="cuda" is unavailable.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
