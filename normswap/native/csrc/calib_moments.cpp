// Row moments for UAN's EM (normswap/variants/uan/em.py: single_gaussian and the warm start's _groups) in one
// read of the values.
//
// Per row c of x (C, n), float32 or float64, every value converted exactly to float64: the row's sum, the sum of
// squared deviations from a centre (the given mean[c], or the row's own mean sum / n), and, with group > 0 (n a
// multiple of it), the mean and the mean squared deviation of each run of `group` consecutive values. A row is
// 16 KiB at UAN's usual 4096 float32 values, so the second loop over it reads the cache, not memory. Sums run
// in a fixed order within the row (four partial sums per group, the groups in order): a row's results depend on
// that row alone, at any thread count.
#include "native.h"

#include <algorithm>
#include <vector>

namespace normswap_native {
namespace calib {
namespace {

template <typename T>
inline double sum_run(const T* p, int64_t m) {
  double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    a0 += static_cast<double>(p[i]);
    a1 += static_cast<double>(p[i + 1]);
    a2 += static_cast<double>(p[i + 2]);
    a3 += static_cast<double>(p[i + 3]);
  }
  for (; i < m; ++i) a0 += static_cast<double>(p[i]);
  return (a0 + a1) + (a2 + a3);
}

// row_moments(x (C, n), mean (C,)? float64, group) -> [sum (C,), sqdev (C,), gmean (C, G), gs2 (C, G)], float64;
// G = n / group (0 columns when group is 0).
std::vector<at::Tensor> row_moments(const at::Tensor& x, const std::optional<at::Tensor>& mean, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && !x.is_cuda(),
              "normswap_native::row_moments: x must be a contiguous CPU (C, n) matrix");
  const int64_t c = x.size(0), n = x.size(1);
  TORCH_CHECK(group >= 0 && (group == 0 || (n > 0 && n % group == 0)),
              "normswap_native::row_moments: the group size must divide the row length");
  const bool has_mean = mean.has_value() && mean->defined();
  if (has_mean) {
    TORCH_CHECK(mean->scalar_type() == at::kDouble && mean->is_contiguous() && mean->numel() == c,
                "normswap_native::row_moments: mean must be contiguous float64 of shape (C,)");
  }
  const int64_t size = group > 0 ? group : std::max<int64_t>(n, 1), g = group > 0 ? n / group : 0;
  at::Tensor sums = at::zeros({c}, at::kDouble), sq = at::zeros({c}, at::kDouble),
             gmean = at::empty({c, g}, at::kDouble), gs2 = at::empty({c, g}, at::kDouble);
  const double* mp = has_mean ? mean->data_ptr<double>() : nullptr;
  double *sp = sums.data_ptr<double>(), *qp = sq.data_ptr<double>(), *gm = gmean.data_ptr<double>(),
         *gq = gs2.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_moments", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t runs = n == 0 ? 0 : (n + size - 1) / size;
    at::parallel_for(0, c, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n)), [&](int64_t begin, int64_t end) {
      std::vector<double> run_sum(static_cast<size_t>(runs));
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * n;
        double total = 0.0;
        for (int64_t j = 0; j < runs; ++j) {
          run_sum[j] = sum_run(row + j * size, std::min(size, n - j * size));
          total += run_sum[j];
        }
        sp[r] = total;
        const double centre = mp != nullptr ? mp[r] : (n > 0 ? total / static_cast<double>(n) : 0.0);
        double dev = 0.0;
        for (int64_t j = 0; j < runs; ++j) {
          const int64_t m = std::min(size, n - j * size);
          const double local = run_sum[j] / static_cast<double>(m);
          double d_run = 0.0, d_row = 0.0;
          for (int64_t i = 0; i < m; ++i) {
            const double v = static_cast<double>(row[j * size + i]);
            d_run += (v - local) * (v - local);
            d_row += (v - centre) * (v - centre);
          }
          dev += d_row;
          if (group > 0) {
            gm[r * g + j] = local;
            gq[r * g + j] = d_run / static_cast<double>(m);
          }
        }
        qp[r] = dev;
      }
    });
  });
  return {sums, sq, gmean, gs2};
}

}  // namespace
}  // namespace calib

TORCH_LIBRARY_FRAGMENT(normswap_native, m) {
  m.def("row_moments(Tensor x, Tensor? mean, int group) -> Tensor[]", &calib::row_moments);
}
}  // namespace normswap_native
