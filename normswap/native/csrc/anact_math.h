// ANAct's activations in ATen's vector type, shared by its calibration sums (calib_sums.cpp) and its fused
// eval-time map (anact_affine.cpp): f(x) and f'(x) per vector of values, by the formulas torch's CPU kernels use.
#pragma once
#include <cmath>
#include <string>

#include "native.h"

namespace normswap_native {
namespace anact {

namespace kinds {
enum Kind { kRelu, kRelu6, kLeaky, kHardswish, kHardsigmoid, kSilu, kGelu, kGeluTanh, kSigmoid, kTanh };
}  // namespace kinds
using kinds::Kind;
using namespace kinds;

inline Kind parse_kind(const std::string& k) {
  if (k == "relu") return kRelu;
  if (k == "relu6") return kRelu6;
  if (k == "leaky_relu") return kLeaky;
  if (k == "hardswish") return kHardswish;
  if (k == "hardsigmoid") return kHardsigmoid;
  if (k == "silu") return kSilu;
  if (k == "gelu") return kGelu;
  if (k == "gelu_tanh") return kGeluTanh;
  if (k == "sigmoid") return kSigmoid;
  if (k == "tanh") return kTanh;
  TORCH_CHECK(false, "normswap_native: no native kernel for activation ", k);
}

// f(x) and f'(x) as torch computes them (its CPU kernels' formulas; f' as its backward kernels give it,
// including the subgradient 0 at the kinks of relu, relu6 and hardsigmoid).
template <typename T>
inline void activation(Kind kind, T p, const at::vec::Vectorized<T>& x, at::vec::Vectorized<T>& f,
                       at::vec::Vectorized<T>& fp) {
  using V = at::vec::Vectorized<T>;
  const V zero(T(0)), one(T(1)), three(T(3)), six(T(6)), half(T(0.5));
  switch (kind) {
    case kRelu:
      f = at::vec::clamp_min(x, zero);
      fp = (x > zero) & one;
      break;
    case kRelu6:
      f = at::vec::minimum(at::vec::maximum(x, zero), six);
      fp = (x > zero) & (x < six) & one;
      break;
    case kLeaky:
      f = V::blendv(x * V(p), x, x > zero);
      fp = V::blendv(V(p), one, x > zero);
      break;
    case kHardswish:
      f = x * at::vec::minimum(at::vec::maximum(x + three, zero), six) / six;
      fp = V::blendv(V::blendv(x / three + half, one, x >= three), zero, x <= V(T(-3)));  // torch: 0 at -3, 1 at 3
      break;
    case kHardsigmoid:
      f = at::vec::minimum(at::vec::maximum(x + three, zero), six) / six;
      fp = (x > V(T(-3))) & (x < three) & V(T(1.0f / 6.0f));  // torch's constant, a float even for double
      break;
    case kSilu: {
      const V e = one + x.neg().exp();
      const V s = e.reciprocal();
      f = x / e;
      fp = s * (one + x * (one - s));
      break;
    }
    case kGelu: {
      const V cdf = half * (one + (x * V(T(M_SQRT1_2))).erf());
      f = x * cdf;
      const V pdf = (x * x * V(T(-0.5))).exp() * V(T(M_2_SQRTPI * M_SQRT1_2 * 0.5));
      fp = cdf + x * pdf;
      break;
    }
    case kGeluTanh: {
      const T beta = T(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = T(0.044715);
      const V x2 = x * x;
      const V t = (V(beta) * (x + V(kappa) * x2 * x)).tanh();
      f = half * x * (one + t);
      fp = half * (one + t) + half * x * (one - t * t) * V(beta) * (one + V(T(3) * kappa) * x2);
      break;
    }
    case kSigmoid: {
      const V s = (one + x.neg().exp()).reciprocal();
      f = s;
      fp = (one - s) * s;
      break;
    }
    case kTanh: {
      const V t = x.tanh();
      f = t;
      fp = one - t * t;
      break;
    }
  }
}

}  // namespace anact
}  // namespace normswap_native
