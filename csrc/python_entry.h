// The Python-callable functions of the module fbfast._C (csrc/fbfast.cpp lists them).
#pragma once

#include <Python.h>

namespace fbfast {

// fbfast._C.rollout: the direct entry of fbfast.rollout for plain CPU tensors
// (csrc/python_entry.cpp).
PyObject* python_rollout(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

}  // namespace fbfast
