// Schemas of torch.ops.fedrot_ext.* and the Python module entry point
// (the module itself is empty: importing it loads the library, whose static
// initialisers register the ops, as in pytorch/extension-cpp).
#include <Python.h>

#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fedrot_ext, m) {
  m.def(
      "align_and_aggregate(Tensor[] A, Tensor[] B, Tensor?[] ref_A, Tensor?[] ref_B, Tensor weights, int[] align, "
      "Tensor lam, bool allow_reflection) -> (Tensor[], Tensor[], Tensor[], Tensor)");
  // The same op on per-client tensors: A[l * N + i] is client i's (r_l, in_l) factor of layer l.
  m.def(
      "align_and_aggregate_clients(Tensor[] A, Tensor[] B, Tensor?[] ref_A, Tensor?[] ref_B, Tensor weights, "
      "int[] align, Tensor lam, bool allow_reflection) -> (Tensor[], Tensor[], Tensor[], Tensor)");
  m.def(
      "choose_lam(Tensor[] A, Tensor[] B, Tensor?[] ref_A, Tensor?[] ref_B, Tensor weights, int[] align, "
      "float[] grid, bool allow_reflection) -> (Tensor, Tensor)");
  m.def("procrustes_rotation(Tensor M, float lam, bool allow_reflection) -> Tensor");
}
