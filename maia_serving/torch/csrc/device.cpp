// The device as one translation unit, each concern still in its own file: ATen's headers are most of a
// file's compile time (about 10 s each, 25 s for all six in one unit against 70 s apart), and `make setup`
// builds the device once per engine environment. The files share no names outside their namespaces.
#include "runtime.cpp"
#include "trace.cpp"
#include "aten.cpp"
#include "fallback.cpp"
#include "kernels.cpp"
#include "module.cpp"
