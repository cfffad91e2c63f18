// Calibration sums in one pass: ANAct's statistics (normswap/variants/anact/stats.py, block_sums),
// PatchNorm's per-channel least-squares sums (normswap/variants/patchnorm/calib.py, lsq_accumulate) and the
// per-site errors of evaluate's fidelity report (normswap/calibration/report.py).
//
// Layout: a contiguous tensor seen as (A, C, L) -- planes of L values, plane p = a * C + c belongs to channel c
// (an (N, C, H, W) activation: A = N, L = H * W) -- or flat (C = 1, planes of a fixed kPlane values, the last one
// shorter). Each plane's sums are float64 (every value, and every product of two values, converted exactly),
// accumulated per vector lane in a fixed order and written to its own row of a (planes, S) buffer; the planes
// are then added per channel in plane order. No sum depends on the thread count or on how at::parallel_for
// splits the planes.
#include "anact_math.h"
#include "native.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace normswap_native {
namespace calib {
namespace {

using at::vec::Vectorized;
using anact::Kind;
using anact::activation;
using anact::parse_kind;
using namespace anact::kinds;
constexpr int64_t kPlane = 1 << 16;  // values per plane of a flat (per-site) tensor

struct Planes {
  int64_t count, channels, length, total;  // planes, channels, values per plane (the last may be short), values
  int64_t size(int64_t p) const { return std::min(length, total - p * length); }
};

Planes planes_of(const at::Tensor& x, int64_t channels) {
  TORCH_CHECK(x.is_contiguous() && !x.is_cuda(), "normswap_native: calibration sums need a contiguous CPU tensor");
  const int64_t n = x.numel();
  if (channels <= 0) {  // flat: one channel, fixed planes
    return {std::max<int64_t>(1, (n + kPlane - 1) / kPlane), 1, kPlane, n};
  }
  TORCH_CHECK(x.dim() >= 2 && x.size(1) == channels, "normswap_native: expected ", channels, " channels in dim 1");
  const int64_t length = n / std::max<int64_t>(1, x.size(0) * channels);
  return {x.size(0) * channels, channels, length, n};
}

// Runs body(plane, out_row) over every plane in parallel, then adds the rows per channel in plane order:
// returns (S, C) float64.
template <int S, typename Body>
at::Tensor reduce_planes(const Planes& pl, const Body& body) {
  at::Tensor rows = at::zeros({pl.count, S}, at::kDouble);
  double* r = rows.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, pl.length));
  at::parallel_for(0, pl.count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) body(p, r + p * S);
  });
  at::Tensor out = at::zeros({S, pl.channels}, at::kDouble);
  double* o = out.data_ptr<double>();
  for (int64_t p = 0; p < pl.count; ++p) {
    const int64_t c = p % pl.channels;
    for (int s = 0; s < S; ++s) o[s * pl.channels + c] += r[p * S + s];
  }
  return out;
}

// Each sum's vector lanes added in lane order into out[s] (a plane's result row).
template <int S, int L>
inline void lanes_to(const double (&acc)[S][L], double* out) {
  for (int s = 0; s < S; ++s) {
    double t = 0;
    for (int l = 0; l < L; ++l) t += acc[s][l];
    out[s] = t;
  }
}

// ---- ANAct: sum d, sum d^2, sum f, sum f^2, sum f'^2 (f' for relu / relu6, where f'^2 = f') with d = x - shift.
template <typename T>
void anact_plane(const T* x, int64_t n, T shift, Kind kind, T p, bool step, double* out) {
  using V = Vectorized<T>;
  constexpr int L = V::size();
  double acc[5][L] = {};
  alignas(64) T bd[L], bf[L], bp[L];
  const V vs(shift);
  for (int64_t i = 0; i < n; i += L) {
    const int64_t m = std::min<int64_t>(L, n - i);
    const V x_v = m == L ? V::loadu(x + i) : V::loadu(x + i, m);
    V f, fp;
    activation<T>(kind, p, x_v, f, fp);
    (x_v - vs).store(bd);
    f.store(bf);
    fp.store(bp);
    for (int l = 0; l < m; ++l) {  // lanes past m (the plane's tail) add nothing
      const double d = bd[l], fv = bf[l], g = bp[l];
      acc[0][l] += d;
      acc[1][l] += d * d;
      acc[2][l] += fv;
      acc[3][l] += fv * fv;
      acc[4][l] += step ? g : g * g;
    }
  }
  lanes_to(acc, out);
}

// anact_sums(x, shift, kind, param, channels): (5, C) float64, or (5, 1) flat when channels <= 0; shift is
// float64 (C,) or (1,), cast to x's dtype before the subtraction as the eager path does.
at::Tensor anact_sums(const at::Tensor& x, const at::Tensor& shift, const std::string& kind_name, double param,
                      int64_t channels) {
  const Kind kind = parse_kind(kind_name);
  const bool step = kind == kRelu || kind == kRelu6;
  const Planes pl = planes_of(x, channels);
  const at::Tensor sh = shift.to(at::kDouble).contiguous();
  TORCH_CHECK(sh.numel() == pl.channels, "normswap_native::anact_sums: shift has ", sh.numel(), " values for ",
              pl.channels, " channels");
  const double* shp = sh.data_ptr<double>();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "anact_sums", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    out = reduce_planes<5>(pl, [&](int64_t p, double* row) {
      anact_plane<scalar_t>(xp + p * pl.length, pl.size(p), scalar_t(shp[p % pl.channels]), kind, scalar_t(param),
                            step, row);
    });
  });
  return out;
}

// ---- PatchNorm: sum w, sum r, sum w^2, sum w r with r = target - base (target alone without base); base is
// full-size, or one value per channel (a bias).
template <typename T>
void lsq_plane(const T* w, const T* t, const T* b, T bias, int64_t n, double* out) {
  using V = Vectorized<T>;
  constexpr int L = V::size();
  double acc[4][L] = {};
  alignas(64) T bw[L], br[L];
  const V vb(bias);
  for (int64_t i = 0; i < n; i += L) {
    const int64_t m = std::min<int64_t>(L, n - i);
    const V wv = m == L ? V::loadu(w + i) : V::loadu(w + i, m);
    V rv = m == L ? V::loadu(t + i) : V::loadu(t + i, m);
    rv = b != nullptr ? rv - (m == L ? V::loadu(b + i) : V::loadu(b + i, m)) : rv - vb;
    wv.store(bw);
    rv.store(br);
    for (int l = 0; l < m; ++l) {
      const double a = bw[l], r = br[l];
      acc[0][l] += a;
      acc[1][l] += r;
      acc[2][l] += a * a;
      acc[3][l] += a * r;
    }
  }
  lanes_to(acc, out);
}

// lsq_sums(w, target, base?): (4, C) float64 over the channels of dim 1; base None, full-size, or (C,).
at::Tensor lsq_sums(const at::Tensor& w, const at::Tensor& target, const std::optional<at::Tensor>& base) {
  TORCH_CHECK(target.sizes() == w.sizes() && target.scalar_type() == w.scalar_type() && target.is_contiguous(),
              "normswap_native::lsq_sums: target must match w (shape, dtype, contiguous)");
  const int64_t channels = w.size(1);
  const bool has_base = base.has_value() && base->defined();
  const bool per_channel = has_base && base->dim() == 1 && base->numel() == channels;
  if (has_base && !per_channel) {
    TORCH_CHECK(base->sizes() == w.sizes() && base->scalar_type() == w.scalar_type() && base->is_contiguous(),
                "normswap_native::lsq_sums: base must match w (shape, dtype, contiguous) or have one value per channel");
  }
  const Planes pl = planes_of(w, channels);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "lsq_sums", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* tp = target.data_ptr<scalar_t>();
    at::Tensor bias = per_channel ? base->to(w.scalar_type()).contiguous() : at::Tensor();
    const scalar_t* bc = per_channel ? bias.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = has_base && !per_channel ? base->data_ptr<scalar_t>() : nullptr;
    out = reduce_planes<4>(pl, [&](int64_t p, double* row) {
      const int64_t off = p * pl.length;
      lsq_plane<scalar_t>(wp + off, tp + off, bp ? bp + off : nullptr, bc ? bc[p % channels] : scalar_t(0),
                          pl.size(p), row);
    });
  });
  return out;
}

// ---- evaluate's per-site errors (normswap/calibration/report.py): sum (a - b)^2 and sum b^2 over two tensors of
// one shape, flat planes; the difference taken in float64 of the values converted exactly.
template <typename T>
void diff_plane(const T* a, const T* b, int64_t n, double* out) {
  using V = Vectorized<T>;
  constexpr int L = V::size();
  double acc[2][L] = {};
  alignas(64) T ba[L], bb[L];
  for (int64_t i = 0; i < n; i += L) {
    const int64_t m = std::min<int64_t>(L, n - i);
    (m == L ? V::loadu(a + i) : V::loadu(a + i, m)).store(ba);
    (m == L ? V::loadu(b + i) : V::loadu(b + i, m)).store(bb);
    for (int l = 0; l < m; ++l) {
      const double y = bb[l], d = static_cast<double>(ba[l]) - y;
      acc[0][l] += d * d;
      acc[1][l] += y * y;
    }
  }
  lanes_to(acc, out);
}

// diff_sums(a, b): (2,) float64 [sum (a - b)^2, sum b^2]; a and b contiguous, of one shape and dtype.
at::Tensor diff_sums(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && b.is_contiguous(),
              "normswap_native::diff_sums: b must match a (shape, dtype, contiguous)");
  const Planes pl = planes_of(a, 0);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "diff_sums", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    out = reduce_planes<2>(pl, [&](int64_t p, double* row) {
      diff_plane<scalar_t>(ap + p * pl.length, bp + p * pl.length, pl.size(p), row);
    });
  });
  return out.reshape({2});
}

}  // namespace
}  // namespace calib

TORCH_LIBRARY_FRAGMENT(normswap_native, m) {
  m.def("diff_sums(Tensor a, Tensor b) -> Tensor", &calib::diff_sums);
  m.def("anact_sums(Tensor x, Tensor shift, str kind, float param, int channels) -> Tensor", &calib::anact_sums);
  m.def("lsq_sums(Tensor w, Tensor target, Tensor? base) -> Tensor", &calib::lsq_sums);
}
}  // namespace normswap_native
