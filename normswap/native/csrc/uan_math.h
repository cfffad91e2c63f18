// Vector arithmetic of UAN's channel-mode kernel (uan_channel.cpp): 2^y and exp(y) for exponents in
// [floor, 0], and 1 / d for d in [1, K]. Every exponent the kernel takes is floored above the subnormal range and
// is at most 0 (the largest l_k is subtracted), so float32 needs no range checks.
#pragma once
#include <type_traits>

#include "native.h"

namespace normswap_native {
namespace uan {

template <typename T>
using V = at::vec::Vectorized<T>;

constexpr double kLog2e = 1.4426950408889634;

template <typename T>
constexpr T floor_of() {
  return std::is_same_v<T, float> ? T(-64) : T(-512);  // fused.py's EXP_FLOOR
}

// 2^y: float32 splits y = n + r (n rounded by a magic-number add, r exact, |r| <= 1/2), takes a degree-6
// polynomial for 2^r (fitted for this kernel: 1.6 ulp on [-1/2, 1/2]) and adds n to the exponent bits:
// 11 operations. float64, and CPUs without AVX2, use Sleef's exp2 through ATen.
template <typename T>
inline V<T> vexp2(const V<T>& v) {
  return v.exp2();
}

// exp(y) = 2^(y log2(e)). The product's rounding moves a weight 2^y by at most |y| 2^y 6e-8 of the largest
// weight (1), about half an ulp of it. float64 uses Sleef's exp.
template <typename T>
inline V<T> vexp(const V<T>& v) {
  return v.exp();
}

// 1 / d: float32 takes the hardware's reciprocal estimate and one Newton step (about 1 ulp) instead of a
// division, which costs about as much as a component's exponential; float64 divides.
template <typename T>
inline V<T> recip(const V<T>& d) {
  return V<T>(T(1)) / d;
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <>
inline V<float> vexp2<float>(const V<float>& y) {
  const V<float> magic(12582912.0f);  // 1.5 * 2^23: y + magic rounds y to n, held in the low mantissa bits
  const V<float> t = y + magic;
  const V<float> r = y - (t - magic);
  V<float> p = at::vec::fmadd(V<float>(1.5370704932138324e-4f), r, V<float>(1.3399848248809576e-3f));
  p = at::vec::fmadd(p, r, V<float>(9.618373587727547e-3f));
  p = at::vec::fmadd(p, r, V<float>(5.550329014658928e-2f));
  p = at::vec::fmadd(p, r, V<float>(2.4022647738456726e-1f));
  p = at::vec::fmadd(p, r, V<float>(6.931471824645996e-1f));
  p = at::vec::fmadd(p, r, V<float>(1.0f));
  // 2^r 2^n: n << 23 (two's complement, from t's low bits) added to p's exponent bits. An integer add, not a
  // float product, so no later sum can be contracted with it.
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(
      _mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(_mm512_castps_si512(t), 23)));
#else
  return _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_castps_si256(t), 23)));
#endif
}

template <>
inline V<float> vexp<float>(const V<float>& y) {
  return vexp2<float>(y * V<float>(static_cast<float>(kLog2e)));
}

template <>
inline V<float> recip<float>(const V<float>& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const V<float> r(_mm512_rcp14_ps(d));
#else
  const V<float> r(_mm256_rcp_ps(d));
#endif
  return r * at::vec::fnmadd(d, r, V<float>(2.0f));  // r (2 - d r)
}
#endif

}  // namespace uan
}  // namespace normswap_native
