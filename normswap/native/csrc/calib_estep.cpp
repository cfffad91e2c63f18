// The fast form of UAN's EM E step (normswap/variants/uan/estep.py, _estep_fast) as one pass over each row.
//
// Per row c of x (C, n) and value x: y = x - m_c, q = y^2 (+ s2 for grouped values), the K scaled densities
// e_k = exp(B_k y + A_k q + C_k) (= p_k(x) e^-cmax), tot = sum_k e_k, and with weight u = 1 (or w[j]) the sums
// sum u log(tot), and per component sum u e_k / tot * [1, y, q]; plus the row's smallest tot (the caller redoes a
// row in the plain form when it underflows). Everything is float64, accumulated per vector lane in column order
// and added across lanes at the end of the row: a row's sums depend on that row alone, at any thread count and
// whatever rows share a call. The eager path does the same arithmetic as batched matrix products, about seven
// passes over (K, rows, cols).
#include "native.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace normswap_native {
namespace calib {
namespace {

using Vd = at::vec::Vectorized<double>;
constexpr int kLanes = Vd::size();
constexpr int64_t kMaxK = 64;

template <typename T>
inline Vd load_double(const T* p, int64_t m) {
  alignas(64) double buf[kLanes];
  for (int l = 0; l < kLanes; ++l) buf[l] = l < m ? static_cast<double>(p[l]) : 0.0;
  return Vd::loadu(buf);
}

template <>
inline Vd load_double<double>(const double* p, int64_t m) {
  return m == kLanes ? Vd::loadu(p) : Vd::loadu(p, m);
}

// One row: coef (K, 2) = [B, A], cst (K,), out: sums (K, 3), loglik, tmin. KK > 0: K known at compile time
// (the loops over components unrolled, the accumulators in registers); KK = 0: any K up to kMaxK.
template <typename T, int KK>
void estep_row(const T* x, int64_t n, double centre, const double* coef, const double* cst, int64_t k_dyn,
               const double* w, const double* s2, bool stats, double* sums, double* loglik, double* tmin) {
  const int64_t k = KK > 0 ? KK : k_dyn;
  Vd acc[KK > 0 ? KK : kMaxK][3];
  Vd e[KK > 0 ? KK : kMaxK];
  for (int64_t j = 0; j < k; ++j) acc[j][0] = acc[j][1] = acc[j][2] = Vd(0.0);
  Vd ll(0.0), lo(std::numeric_limits<double>::infinity());
  const Vd m(centre);
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t cnt = std::min<int64_t>(kLanes, n - i);
    const Vd y = load_double<T>(x + i, cnt) - m;
    Vd q = y * y;
    if (s2 != nullptr) q = q + load_double<double>(s2 + i, cnt);
    Vd tot(0.0);
    for (int64_t j = 0; j < k; ++j) {
      e[j] = (Vd(coef[2 * j]) * y + Vd(coef[2 * j + 1]) * q + Vd(cst[j])).exp();
      tot = tot + e[j];
    }
    Vd u(1.0);
    if (w != nullptr) u = load_double<double>(w + i, cnt);
    if (cnt < kLanes) {  // lanes past the row's end: tot 1 (log 0, no minimum), weight 0
      alignas(64) double t[kLanes], uu[kLanes];
      tot.store(t);
      u.store(uu);
      for (int l = static_cast<int>(cnt); l < kLanes; ++l) t[l] = 1.0, uu[l] = 0.0;
      tot = Vd::loadu(t);
      u = Vd::loadu(uu);
    }
    lo = at::vec::minimum(lo, tot);
    ll = ll + tot.log() * u;
    if (!stats) continue;
    const Vd inv = u / tot;
    for (int64_t j = 0; j < k; ++j) {
      const Vd r = e[j] * inv;
      acc[j][0] = acc[j][0] + r;
      acc[j][1] = acc[j][1] + r * y;
      acc[j][2] = acc[j][2] + r * q;
    }
  }
  alignas(64) double buf[kLanes];
  auto lanes_sum = [&](const Vd& v) {
    v.store(buf);
    double s = 0.0;
    for (int l = 0; l < kLanes; ++l) s += buf[l];
    return s;
  };
  *loglik = lanes_sum(ll);
  lo.store(buf);
  double mn = buf[0];
  for (int l = 1; l < kLanes; ++l) mn = std::min(mn, buf[l]);
  *tmin = mn;
  for (int64_t j = 0; j < k; ++j)
    for (int s = 0; s < 3; ++s) sums[j * 3 + s] = stats ? lanes_sum(acc[j][s]) : 0.0;
}

// estep_fast(x (R, n), rows (C,)?, centre (C,), coef (C, K, 2), const (C, K), w (1, n)?, s2 (R, n)?, stats)
//   -> [sums (C, K, 3), loglik (C,), tmin (C,)], all float64. Output row r is x's row rows[r] (row r without
//   rows): EM's channels still iterating, read where they are instead of gathered into a new matrix each step.
std::vector<at::Tensor> estep_fast(const at::Tensor& x, const std::optional<at::Tensor>& rows,
                                   const at::Tensor& centre, const at::Tensor& coef, const at::Tensor& cst,
                                   const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& s2,
                                   bool stats) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && !x.is_cuda(), "normswap_native::estep_fast: x must be a "
              "contiguous CPU (C, n) matrix");
  const bool has_rows = rows.has_value() && rows->defined();
  const int64_t c = has_rows ? rows->numel() : x.size(0), n = x.size(1), k = coef.size(1);
  std::vector<int64_t> src(c);
  if (has_rows) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() == 1 && !rows->is_cuda(),
                "normswap_native::estep_fast: rows must be a CPU int64 vector");
    const at::Tensor r64 = rows->contiguous();
    const int64_t* rp = r64.data_ptr<int64_t>();
    for (int64_t r = 0; r < c; ++r) {
      TORCH_CHECK(rp[r] >= 0 && rp[r] < x.size(0), "normswap_native::estep_fast: row index out of range");
      src[r] = rp[r];
    }
  } else {
    for (int64_t r = 0; r < c; ++r) src[r] = r;
  }
  TORCH_CHECK(k >= 1 && k <= kMaxK, "normswap_native::estep_fast: 1 to 64 components");
  auto f64 = [&](const at::Tensor& t, at::IntArrayRef shape, const char* what) {
    TORCH_CHECK(t.scalar_type() == at::kDouble && t.is_contiguous() && t.sizes() == shape,
                "normswap_native::estep_fast: ", what, " must be contiguous float64 of shape ", shape);
    return t.data_ptr<double>();
  };
  const double* cp = f64(centre, {c}, "centre");
  const double* kp = f64(coef, {c, k, 2}, "coef");
  const double* sp = f64(cst, {c, k}, "const");
  const bool has_w = w.has_value() && w->defined(), has_s2 = s2.has_value() && s2->defined();
  const double* wp = has_w ? f64(*w, {1, n}, "w") : nullptr;
  const double* qp = has_s2 ? f64(*s2, {x.size(0), n}, "s2") : nullptr;
  at::Tensor sums = at::zeros({c, k, 3}, at::kDouble), ll = at::zeros({c}, at::kDouble),
             tmin = at::empty({c}, at::kDouble);
  double *op = sums.data_ptr<double>(), *lp = ll.data_ptr<double>(), *tp = tmin.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "estep_fast", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, n * k));
    auto row = k == 1 ? &estep_row<scalar_t, 1> : k == 2 ? &estep_row<scalar_t, 2> : k == 3 ? &estep_row<scalar_t, 3>
               : k == 4 ? &estep_row<scalar_t, 4> : &estep_row<scalar_t, 0>;
    at::parallel_for(0, c, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        row(xp + src[r] * n, n, cp[r], kp + r * k * 2, sp + r * k, k, wp, qp ? qp + src[r] * n : nullptr, stats,
            op + r * k * 3, lp + r, tp + r);
      }
    });
  });
  return {sums, ll, tmin};
}

}  // namespace
}  // namespace calib

TORCH_LIBRARY_FRAGMENT(normswap_native, m) {
  m.def("estep_fast(Tensor x, Tensor? rows, Tensor centre, Tensor coef, Tensor const, Tensor? w, Tensor? s2, "
        "bool stats) -> Tensor[]",
        &calib::estep_fast);
}
}  // namespace normswap_native
