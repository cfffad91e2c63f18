// Shared by normswap's native kernels: ATen's vector type and parallel loop, and the library's ABI number.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

namespace normswap_native {
// Raised whenever an operator's signature or meaning changes; Python checks it after loading.
constexpr int64_t kAbi = 1;
}  // namespace normswap_native
