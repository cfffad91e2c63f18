// ANAct's eval-time map in one pass (normswap/variants/anact/layer.py, forward): out = a * f(x) + b, where f is
// the site's activation and (a, b) the per-site map's cached scale and shift. The eager path makes two passes: the
// activation (often in place) and torch.add(b, f, alpha=a). The arithmetic is theirs, bit for bit: f as torch's
// kernels compute relu, relu6 and leaky_relu (the only kinds taken), then one fused multiply-add per value (as
// torch's add with alpha). A per-channel map stays eager: its mul_ then add_ round twice, and the compiler may
// contract a vectorised multiply and add into one FMA here. `out` may be x itself.
#include "anact_math.h"
#include "native.h"

#include <algorithm>

namespace normswap_native {
namespace anact {
namespace {

using at::vec::Vectorized;
using namespace kinds;

// f for the kinds the layer sends here, as torch's CPU kernels compute them (clamp for relu / relu6, blendv for
// leaky_relu); the kind is a template argument, so the loop holds no branch.
template <typename T, int KIND>
inline Vectorized<T> act(const Vectorized<T>& x, const Vectorized<T>& p) {
  using V = Vectorized<T>;
  if constexpr (KIND == kRelu) {
    return at::vec::clamp_min(x, V(T(0)));
  } else if constexpr (KIND == kRelu6) {
    return at::vec::clamp(x, V(T(0)), V(T(6)));
  } else {
    return V::blendv(x * p, x, x > V(T(0)));
  }
}

template <typename T, int KIND>
void apply_run(T p, const T* src, T* dst, int64_t m, T a, T b) {
  using V = Vectorized<T>;
  const V va(a), vb(b), vp(p);
  int64_t i = 0;
  for (; i + V::size() <= m; i += V::size()) {
    at::vec::fmadd(act<T, KIND>(V::loadu(src + i), vp), va, vb).store(dst + i);
  }
  if (i < m) {
    const int64_t cnt = m - i;
    at::vec::fmadd(act<T, KIND>(V::loadu(src + i, cnt), vp), va, vb).store(dst + i, cnt);
  }
}

// anact_affine(x, kind, param, scale, shift, out): out = scale * f(x) + shift; scale a number (cast to x's dtype,
// as torch's add casts its alpha), shift one element of x's dtype; out contiguous like x (x itself allowed).
void anact_affine(const at::Tensor& x, const std::string& kind, double param, double scale, const at::Tensor& shift,
                  at::Tensor out) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && !x.is_cuda() && !out.is_cuda() && out.sizes() == x.sizes(),
              "normswap_native::anact_affine: contiguous CPU tensors of one shape");
  TORCH_CHECK(shift.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type() && shift.numel() == 1,
              "normswap_native::anact_affine: one shift, and out, in x's dtype");
  const Kind k = parse_kind(kind);
  TORCH_CHECK(k == kRelu || k == kRelu6 || k == kLeaky, "normswap_native::anact_affine: relu, relu6 or leaky_relu "
              "only (the activations whose values it computes exactly as torch does)");
  const int64_t n = x.numel(), length = 1 << 15;  // runs of 32K values in parallel
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "anact_affine", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t a = static_cast<scalar_t>(scale), b = shift.item<scalar_t>(), p = static_cast<scalar_t>(param);
    at::parallel_for(0, (n + length - 1) / length, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t off = q * length, m = std::min(length, n - off);
        if (k == kRelu) {
          apply_run<scalar_t, kRelu>(p, xp + off, op + off, m, a, b);
        } else if (k == kRelu6) {
          apply_run<scalar_t, kRelu6>(p, xp + off, op + off, m, a, b);
        } else {
          apply_run<scalar_t, kLeaky>(p, xp + off, op + off, m, a, b);
        }
      }
    });
  });
}

}  // namespace
}  // namespace anact

TORCH_LIBRARY_FRAGMENT(normswap_native, m) {
  m.def("anact_affine(Tensor x, str kind, float param, float scale, Tensor shift, Tensor(a!) out) -> ()",
        &anact::anact_affine);
}
}  // namespace normswap_native
