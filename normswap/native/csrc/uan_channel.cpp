// UAN's channel mode in one pass over x (docs/methods.md section 3.1; the Python reference is
// normswap/variants/uan/kernel.py). With per-component coefficients a, c, b, g (K, C) and p, q (C,) or none:
//
//   z_k = a_k x + c_k,  l_k = b_k - z_k^2 / 2,  e_k = exp(max(l_k - max_j l_j, floor)),
//   y   = sum_k e_k g_k z_k / sum_k e_k + p x + q
//
// and its backward (recomputed from x; t_k = e_k / sum e, w_k = g_k z_k, m = sum_k t_k w_k, u = dL/dy):
//
//   dl_k = u t_k (w_k - m)  -> db_k;   dz_k = u t_k g_k - dl_k z_k  -> dc_k, da_k (times x);
//   dg_k = sum u t_k z_k,   dp = sum u x,  dq = sum u,   dx = u p + sum_k dz_k a_k.
//
// x is (N, C, S...) contiguous, float32 or float64 (the coefficients' dtype). Layout: when a channel's plane
// (S values) holds at least one vector, one parallel loop runs over the N*C planes with the coefficients
// broadcast and the plane vectorised; otherwise (2-D inputs, tiny maps) it runs over samples with the vector
// lanes over channels. The backward's per-channel sums are summed per (n, c) first (in a fixed order inside
// one thread), then over n in order: the result does not depend on the number of threads.
#include <array>
#include <type_traits>
#include <vector>

#include "native.h"
#include "uan_math.h"

namespace normswap_native {
namespace uan {
namespace {

constexpr int64_t kGrainValues = 1 << 14;  // values per parallel task, at least

// Vectors of K per-lane values: fixed-size (unrolled) for K <= 8, heap-allocated otherwise.
template <typename T, int KT>
struct Lanes {
  std::conditional_t<KT == 0, std::vector<V<T>>, std::array<V<T>, (KT == 0 ? 1 : KT)>> v;
  explicit Lanes(int64_t k) {
    if constexpr (KT == 0) v.resize(k);
  }
  V<T>& operator[](int64_t i) { return v[i]; }
  const V<T>& operator[](int64_t i) const { return v[i]; }
};

// The coefficients of one channel (broadcast) or of a run of channels (one per lane). For the forward
// (Log2 = true) b_k is scaled by log2(e), so that with s_k = z_k sqrt(log2(e) / 2) one fma gives
// l_k log2(e) = b'_k - s_k^2 and the weights are 2^(l_k log2(e) - max), the same numbers as exp(l_k - max)
// at fewer operations. z_k = a_k x + c_k stays one fma of the unscaled coefficients: a scaled a_k or a folded
// g_k a_k would add its own rounding to z_k where a_k x and c_k cancel (values near a component's mean).
template <typename T, int KT>
struct Coeffs {
  Lanes<T, KT> a, c, b, g;
  V<T> p, q;
  explicit Coeffs(int64_t k) : a(k), c(k), b(k), g(k), p(T(0)), q(T(0)) {}
};

template <typename T>
struct Rows {
  const T *a, *c, *b, *g, *p, *q;  // (K, C) and (C,) or null
};

struct Args {
  int64_t n, ch, s, k;
};

template <typename T, int KT, bool Log2>
void set(Coeffs<T, KT>& co, int64_t i, const V<T>& a, const V<T>& c, const V<T>& b, const V<T>& g) {
  co.a[i] = a;
  co.c[i] = c;
  co.b[i] = Log2 ? b * V<T>(static_cast<T>(kLog2e)) : b;
  co.g[i] = g;
}

template <typename T, int KT, bool Log2>
void broadcast(Coeffs<T, KT>& co, const Rows<T>& r, int64_t ch, int64_t k, int64_t j) {
  for (int64_t i = 0; i < k; ++i) {
    const int64_t o = i * ch + j;
    set<T, KT, Log2>(co, i, V<T>(r.a[o]), V<T>(r.c[o]), V<T>(r.b[o]), V<T>(r.g[o]));
  }
  co.p = V<T>(r.p ? r.p[j] : T(0));
  co.q = V<T>(r.q ? r.q[j] : T(0));
}

template <typename T, int KT, bool Log2>
void gather(Coeffs<T, KT>& co, const Rows<T>& r, int64_t ch, int64_t k, int64_t j, int64_t cnt) {
  for (int64_t i = 0; i < k; ++i) {
    const int64_t o = i * ch + j;
    set<T, KT, Log2>(co, i, V<T>::loadu(r.a + o, cnt), V<T>::loadu(r.c + o, cnt), V<T>::loadu(r.b + o, cnt),
                     V<T>::loadu(r.g + o, cnt));
  }
  co.p = r.p ? V<T>::loadu(r.p + j, cnt) : V<T>(T(0));
  co.q = r.q ? V<T>::loadu(r.q + j, cnt) : V<T>(T(0));
}

// z_k and the floored, unnormalised weights e_k of one vector x (unscaled coefficients); returns sum_k e_k.
template <typename T, int KT>
inline V<T> weights(const V<T>& x, const Coeffs<T, KT>& co, int64_t k, Lanes<T, KT>& z, Lanes<T, KT>& e) {
  const V<T> mhalf(T(-0.5)), floor(floor_of<T>());
  V<T> top;
  for (int64_t i = 0; i < k; ++i) {
    z[i] = at::vec::fmadd(x, co.a[i], co.c[i]);
    e[i] = at::vec::fmadd(z[i] * mhalf, z[i], co.b[i]);  // l_k
    top = i == 0 ? e[i] : at::vec::maximum(top, e[i]);
  }
  if constexpr (KT == 1) {  // one component: its weight is 1, no exp
    e[0] = V<T>(T(1));
    return e[0];
  }
  V<T> den(T(0));
  for (int64_t i = 0; i < k; ++i) {
    e[i] = vexp<T>(at::vec::maximum(e[i] - top, floor));
    den = den + e[i];
  }
  return den;
}

// y of one vector x (b_k scaled by log2(e) for the forward, Log2 = true).
template <typename T, int KT>
inline V<T> forward_value(const V<T>& x, const Coeffs<T, KT>& co, int64_t k, Lanes<T, KT>& z, Lanes<T, KT>& l) {
  if constexpr (KT == 1) {
    return at::vec::fmadd(co.p, x, at::vec::fmadd(co.g[0], at::vec::fmadd(x, co.a[0], co.c[0]), co.q));
  }
  const V<T> sc(static_cast<T>(0.84932180028801907));  // sqrt(log2(e) / 2)
  const V<T> floor(static_cast<T>(floor_of<T>() * kLog2e));
  V<T> top;
  for (int64_t i = 0; i < k; ++i) {
    z[i] = at::vec::fmadd(x, co.a[i], co.c[i]);
    const V<T> s = z[i] * sc;
    l[i] = at::vec::fnmadd(s, s, co.b[i]);  // l_k log2(e)
    top = i == 0 ? l[i] : at::vec::maximum(top, l[i]);
  }
  V<T> num(T(0)), den(T(0));
  for (int64_t i = 0; i < k; ++i) {
    const V<T> e = vexp2<T>(at::vec::maximum(l[i] - top, floor));
    den = den + e;
    num = at::vec::fmadd(e, co.g[i] * z[i], num);
  }
  return at::vec::fmadd(co.p, x, at::vec::fmadd(num, recip<T>(den), co.q));
}

template <typename T, int KT>
void forward_impl(const T* x, T* y, const Rows<T>& rows, Args d) {
  constexpr int64_t L = V<T>::size();
  if (d.s >= L) {
    const int64_t grain = std::max<int64_t>(1, kGrainValues / d.s);
    at::parallel_for(0, d.n * d.ch, grain, [&](int64_t begin, int64_t end) {
      Coeffs<T, KT> co(d.k);
      Lanes<T, KT> z(d.k), l(d.k);
      for (int64_t plane = begin; plane < end; ++plane) {
        broadcast<T, KT, true>(co, rows, d.ch, d.k, plane % d.ch);
        const T* xp = x + plane * d.s;
        T* yp = y + plane * d.s;
        int64_t i = 0;
        for (; i + L <= d.s; i += L) forward_value<T, KT>(V<T>::loadu(xp + i), co, d.k, z, l).store(yp + i);
        if (i < d.s) forward_value<T, KT>(V<T>::loadu(xp + i, d.s - i), co, d.k, z, l).store(yp + i, d.s - i);
      }
    });
    return;
  }
  // Small planes: lanes over channels, one task per run of samples.
  const int64_t grain = std::max<int64_t>(1, kGrainValues / (d.ch * d.s));
  at::parallel_for(0, d.n, grain, [&](int64_t begin, int64_t end) {
    Coeffs<T, KT> co(d.k);
    Lanes<T, KT> z(d.k), l(d.k);
    std::vector<T> xs(L), ys(L);
    for (int64_t j = 0; j < d.ch; j += L) {
      const int64_t cnt = std::min<int64_t>(L, d.ch - j);
      gather<T, KT, true>(co, rows, d.ch, d.k, j, cnt);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t s = 0; s < d.s; ++s) {
          const T* xp = x + (n * d.ch + j) * d.s + s;
          T* yp = y + (n * d.ch + j) * d.s + s;
          for (int64_t l = 0; l < cnt; ++l) xs[l] = xp[l * d.s];
          forward_value<T, KT>(V<T>::loadu(xs.data(), cnt), co, d.k, z, l).store(ys.data(), cnt);
          for (int64_t l = 0; l < cnt; ++l) yp[l * d.s] = ys[l];
        }
      }
    }
  });
}

// The backward's per-value terms, added to vector accumulators acc (4K + 2: a, c, b, g per k, then p, q);
// returns dx. Lanes with u = 0 (the padding of a partial vector) add exactly zero. Every product that meets a
// sum is an explicit fma (and 2^n is applied by an integer add, uan_math.h), so the compiler has no product to
// contract into an fma for some components and not for others: coinciding components get bitwise equal
// gradients, and an optimiser moves them together (a fine-tune of an uncalibrated layer keeps them coinciding).
template <typename T, int KT>
inline V<T> backward_value(const V<T>& x, const V<T>& u, const Coeffs<T, KT>& co, int64_t k, Lanes<T, KT>& z,
                           Lanes<T, KT>& e, V<T>* acc) {
  const V<T> inv = recip<T>(weights<T, KT>(x, co, k, z, e));
  V<T> m(T(0));
  for (int64_t i = 0; i < k; ++i) {
    e[i] = e[i] * inv;  // t_k
    m = at::vec::fmadd(e[i], co.g[i] * z[i], m);
  }
  V<T> dx = u * co.p;
  for (int64_t i = 0; i < k; ++i) {
    const V<T> ut = u * e[i];
    const V<T> wm = at::vec::fmsub(co.g[i], z[i], m);         // w_k - m
    const V<T> dz = at::vec::fnmadd(ut * wm, z[i], ut * co.g[i]);  // u t_k g_k - dl_k z_k
    acc[i] = at::vec::fmadd(dz, x, acc[i]);                    // da
    acc[k + i] = acc[k + i] + dz;                              // dc
    acc[2 * k + i] = at::vec::fmadd(ut, wm, acc[2 * k + i]);  // db: dl_k = u t_k (w_k - m)
    acc[3 * k + i] = at::vec::fmadd(ut, z[i], acc[3 * k + i]);  // dg
    dx = at::vec::fmadd(dz, co.a[i], dx);
  }
  acc[4 * k] = at::vec::fmadd(u, x, acc[4 * k]);  // dp
  acc[4 * k + 1] = acc[4 * k + 1] + u;            // dq
  return dx;
}

// part (Q, N, C): the per-(n, c) sums of the Q = 4K + 2 quantities.
template <typename T, int KT>
void backward_impl(const T* u, const T* x, T* dx, const Rows<T>& rows, T* part, Args d) {
  constexpr int64_t L = V<T>::size();
  const int64_t nq = 4 * d.k + 2, planes = d.n * d.ch;
  if (d.s >= L) {
    const int64_t grain = std::max<int64_t>(1, kGrainValues / d.s);
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      Coeffs<T, KT> co(d.k);
      Lanes<T, KT> z(d.k), e(d.k);
      std::vector<V<T>> acc(nq);
      for (int64_t plane = begin; plane < end; ++plane) {
        broadcast<T, KT, false>(co, rows, d.ch, d.k, plane % d.ch);
        std::fill(acc.begin(), acc.end(), V<T>(T(0)));
        const int64_t off = plane * d.s;
        int64_t i = 0;
        for (; i + L <= d.s; i += L) {
          backward_value<T, KT>(V<T>::loadu(x + off + i), V<T>::loadu(u + off + i), co, d.k, z, e, acc.data())
              .store(dx + off + i);
        }
        if (i < d.s) {
          const int64_t r = d.s - i;
          backward_value<T, KT>(V<T>::loadu(x + off + i, r), V<T>::loadu(u + off + i, r), co, d.k, z, e,
                                acc.data())
              .store(dx + off + i, r);
        }
        for (int64_t qi = 0; qi < nq; ++qi) {
          part[qi * planes + plane] = at::vec::vec_reduce_all<T>([](V<T>& l, V<T>& r) { return l + r; }, acc[qi]);
        }
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainValues / (d.ch * d.s));
  at::parallel_for(0, d.n, grain, [&](int64_t begin, int64_t end) {
    Coeffs<T, KT> co(d.k);
    Lanes<T, KT> z(d.k), e(d.k);
    std::vector<V<T>> acc(nq);
    std::vector<T> xs(L), us(L), out(L);
    for (int64_t j = 0; j < d.ch; j += L) {
      const int64_t cnt = std::min<int64_t>(L, d.ch - j);
      gather<T, KT, false>(co, rows, d.ch, d.k, j, cnt);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(acc.begin(), acc.end(), V<T>(T(0)));
        for (int64_t s = 0; s < d.s; ++s) {
          const int64_t off = (n * d.ch + j) * d.s + s;
          for (int64_t l = 0; l < cnt; ++l) {
            xs[l] = x[off + l * d.s];
            us[l] = u[off + l * d.s];
          }
          backward_value<T, KT>(V<T>::loadu(xs.data(), cnt), V<T>::loadu(us.data(), cnt), co, d.k, z, e,
                                acc.data())
              .store(out.data(), cnt);
          for (int64_t l = 0; l < cnt; ++l) dx[off + l * d.s] = out[l];
        }
        for (int64_t qi = 0; qi < nq; ++qi) acc[qi].store(part + qi * planes + n * d.ch + j, cnt);
      }
    }
  });
}

template <typename T, typename F>
void dispatch_k(int64_t k, F&& f) {
  switch (k) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

Args check(const at::Tensor& x, const at::Tensor& a, const std::vector<at::Tensor>& coeffs) {
  TORCH_CHECK(x.dim() >= 2 && x.is_contiguous() && x.device().is_cpu(), "uan_channel: x must be a contiguous "
              "CPU tensor (N, C, ...)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "uan_channel: float32 or float64");
  TORCH_CHECK(a.dim() == 2 && a.size(1) == x.size(1), "uan_channel: coefficients (K, C)");
  for (const auto& t : coeffs) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.is_contiguous() && t.device().is_cpu() &&
                    t.numel() == (t.dim() == 2 ? a.numel() : a.size(1)) && t.size(-1) == a.size(1),
                "uan_channel: coefficients must be contiguous, of x's dtype, (K, C) or (C,)");
  }
  const int64_t s = x.dim() > 2 ? x.numel() / std::max<int64_t>(1, x.size(0) * x.size(1)) : 1;
  return Args{x.size(0), x.size(1), s, a.size(0)};
}

template <typename T>
const T* ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

std::vector<at::Tensor> present(std::initializer_list<at::Tensor> ts, const std::optional<at::Tensor>& p,
                                const std::optional<at::Tensor>& q) {
  std::vector<at::Tensor> out(ts);
  if (p.has_value() && p->defined()) out.push_back(*p);
  if (q.has_value() && q->defined()) out.push_back(*q);
  return out;
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& a, const at::Tensor& c, const at::Tensor& b,
                   const at::Tensor& g, const std::optional<at::Tensor>& p, const std::optional<at::Tensor>& q) {
  const Args d = check(x, a, present({a, c, b, g}, p, q));
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "uan_channel_forward", [&] {
    dispatch_k<scalar_t>(d.k, [&](auto kt) {
      const Rows<scalar_t> rows{a.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                                g.data_ptr<scalar_t>(), ptr<scalar_t>(p), ptr<scalar_t>(q)};
      forward_impl<scalar_t, decltype(kt)::value>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, d);
    });
  });
  return y;
}

// Returns dx, then da, dc, db, dg (K, C), dp, dq (C,) (dp is zeros when p is absent).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& a, const at::Tensor& c, const at::Tensor& b,
    const at::Tensor& g, const std::optional<at::Tensor>& p) {
  const Args d = check(x, a, present({a, c, b, g}, p, std::nullopt));
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous() && grad.scalar_type() == x.scalar_type(),
              "uan_channel_backward: grad must be contiguous, of x's shape and dtype");
  const int64_t nq = 4 * d.k + 2, planes = d.n * d.ch;
  at::Tensor dx = at::empty_like(x);
  at::Tensor part = at::zeros({nq, planes}, x.options());
  at::Tensor sums = at::zeros({nq, d.ch}, x.options());
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "uan_channel_backward", [&] {
      dispatch_k<scalar_t>(d.k, [&](auto kt) {
        const Rows<scalar_t> rows{a.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                                  g.data_ptr<scalar_t>(), ptr<scalar_t>(p), nullptr};
        backward_impl<scalar_t, decltype(kt)::value>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                     dx.data_ptr<scalar_t>(), rows, part.data_ptr<scalar_t>(), d);
      });
      // Over samples in order, per quantity: independent of how the planes were split between threads.
      const scalar_t* pp = part.data_ptr<scalar_t>();
      scalar_t* sp = sums.data_ptr<scalar_t>();
      at::parallel_for(0, nq, 1, [&](int64_t begin, int64_t end) {
        for (int64_t qi = begin; qi < end; ++qi) {
          for (int64_t n = 0; n < d.n; ++n) {
            const scalar_t* row = pp + qi * planes + n * d.ch;
            for (int64_t j = 0; j < d.ch; ++j) sp[qi * d.ch + j] += row[j];
          }
        }
      });
    });
  }
  auto k = d.k;
  return {dx, sums.narrow(0, 0, k), sums.narrow(0, k, k), sums.narrow(0, 2 * k, k), sums.narrow(0, 3 * k, k),
          sums[4 * k], sums[4 * k + 1]};
}

}  // namespace
}  // namespace uan

TORCH_LIBRARY_FRAGMENT(normswap_native, m) {
  m.def("uan_channel_forward(Tensor x, Tensor a, Tensor c, Tensor b, Tensor g, Tensor? p, Tensor? q) -> Tensor",
        &uan::forward);
  m.def("uan_channel_backward(Tensor grad, Tensor x, Tensor a, Tensor c, Tensor b, Tensor g, Tensor? p) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        &uan::backward);
}
}  // namespace normswap_native
