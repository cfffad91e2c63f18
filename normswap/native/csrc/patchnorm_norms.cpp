// PatchNorm's patch norms n2 alone (docs/native.md, "PatchNorm"): what calibration accumulates. A depthwise
// conv's n2 = the window sums of x^2 of each channel (one pass over x); a groups = 1 conv's n2 = the window
// sums of the channel sum of squares q (one pass over x, one over q). NCHW, float32 / float64.
#include "patchnorm.h"

namespace normswap_native::patchnorm {
namespace {

// x (N, C, H, W); the conv's kernel, stride, zero padding before (rows, columns), dilation and output size;
// depthwise: n2 per channel (N, C, Ho, Wo), else per sample (N, 1, Ho, Wo).
at::Tensor sq_norm(const at::Tensor& x, c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef pad,
                   c10::IntArrayRef dilation, c10::IntArrayRef out_size, bool depthwise) {
  check_input(x, "x");
  TORCH_CHECK(out_size.size() == 2, "patchnorm_sq_norm: out_size has 2 values");
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor out = at::empty({N, depthwise ? C : 1, out_size[0], out_size[1]}, x.options());
  if (out.numel() == 0 || x.numel() == 0) return out.zero_();
  const Window g(kernel, stride, pad, dilation, x.size(2), x.size(3), out_size[0], out_size[1]);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "patchnorm_sq_norm", [&] {
    if (depthwise) {
      box_planes<scalar_t, Sum::kSquares>(x, g, nullptr, out);
    } else {
      at::Tensor q = at::empty({N, g.H * g.W}, x.options());
      channel_sums<scalar_t>(x, q);
      box_planes<scalar_t, Sum::kBox>(q, g, nullptr, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(normswap_native, m) {
  m.def("patchnorm_sq_norm(Tensor x, int[] kernel, int[] stride, int[] pad, int[] dilation, int[] out_size, "
        "bool depthwise) -> Tensor",
        &sq_norm);
}

}  // namespace normswap_native::patchnorm
