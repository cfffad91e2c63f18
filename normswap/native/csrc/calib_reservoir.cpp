// UAN calibration's reservoir (normswap/variants/uan/reservoir.py): the columns of a block that enter the
// reservoir, copied straight into their slots, and each slot's stream position (start + column) recorded. A column
// is one position of the dims other than the channel dim (row-major); with the block seen as (A, C, B) around its
// channel dim, column j = a * B + b holds block[a, c, b] for every channel c. The eager path builds a (C, P) index
// tensor, takes, and index_puts; this reads each value once and writes it once, in parallel over channels. The
// columns come in stream order and are written in that order, so of several columns entering the same slot within
// one block the last one stays (what Algorithm L means), without the eager path's search for it.
#include "native.h"

#include <algorithm>
#include <vector>

namespace normswap_native {
namespace calib {
namespace {

void reservoir_put(const at::Tensor& block, int64_t channel_dim, const at::Tensor& cols, const at::Tensor& slots,
                   at::Tensor vals, at::Tensor pos, int64_t start) {
  TORCH_CHECK(block.is_contiguous() && vals.is_contiguous() && !block.is_cuda() && !vals.is_cuda(),
              "normswap_native::reservoir_put: contiguous CPU tensors only");
  TORCH_CHECK(block.scalar_type() == vals.scalar_type(), "normswap_native::reservoir_put: dtypes differ");
  TORCH_CHECK(vals.dim() == 2 && cols.numel() == slots.numel() && cols.scalar_type() == at::kLong &&
                  slots.scalar_type() == at::kLong,
              "normswap_native::reservoir_put: bad index tensors");
  const int64_t cd = channel_dim < 0 ? channel_dim + block.dim() : channel_dim;
  TORCH_CHECK(cd >= 0 && cd < block.dim(), "normswap_native::reservoir_put: bad channel dim");
  const int64_t channels = block.size(cd), cap = vals.size(1);
  TORCH_CHECK(vals.size(0) == channels, "normswap_native::reservoir_put: channel counts differ");
  int64_t inner = 1;
  for (int64_t d = cd + 1; d < block.dim(); ++d) inner *= block.size(d);
  const int64_t p = cols.numel();
  const at::Tensor c64 = cols.contiguous(), s64 = slots.contiguous();
  const int64_t* cp = c64.data_ptr<int64_t>();
  const int64_t* sp = s64.data_ptr<int64_t>();
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.numel() == cap && !pos.is_cuda(),
              "normswap_native::reservoir_put: pos must be a contiguous CPU int64 vector of one entry per slot");
  int64_t* pp = pos.data_ptr<int64_t>();
  std::vector<int64_t> off(p);  // column j's offset in channel 0
  for (int64_t j = 0; j < p; ++j) {
    TORCH_CHECK(sp[j] >= 0 && sp[j] < cap, "normswap_native::reservoir_put: slot out of range");
    TORCH_CHECK(cp[j] >= 0 && cp[j] < block.numel() / std::max<int64_t>(1, channels),
                "normswap_native::reservoir_put: column out of range");
    off[j] = (cp[j] / inner) * channels * inner + cp[j] % inner;
    pp[sp[j]] = cp[j] + start;  // in order: of several columns for one slot the last stays
  }
  AT_DISPATCH_FLOATING_TYPES(block.scalar_type(), "reservoir_put", [&] {
    const scalar_t* src = block.data_ptr<scalar_t>();
    scalar_t* dst = vals.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p));
    at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const scalar_t* s = src + c * inner;
        scalar_t* d = dst + c * cap;
        for (int64_t j = 0; j < p; ++j) d[sp[j]] = s[off[j]];  // in order too: the last column stays
      }
    });
  });
}

}  // namespace
}  // namespace calib

TORCH_LIBRARY_FRAGMENT(normswap_native, m) {
  m.def("reservoir_put(Tensor block, int channel_dim, Tensor cols, Tensor slots, Tensor(a!) vals, Tensor(b!) pos, "
        "int start) -> ()",
        &calib::reservoir_put);
}
}  // namespace normswap_native
