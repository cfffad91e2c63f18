// The library's ABI number and vector width: what `python -m normswap.native` reports.
#include "native.h"

namespace normswap_native {
namespace {
int64_t abi() { return kAbi; }
int64_t float_lanes() { return at::vec::Vectorized<float>::size(); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(normswap_native, m) {
  m.def("abi() -> int", &abi);
  m.def("float_lanes() -> int", &float_lanes);
}
}  // namespace normswap_native
