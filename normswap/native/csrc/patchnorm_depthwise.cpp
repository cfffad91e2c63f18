// PatchNorm's depthwise conv in one pass (docs/native.md, "PatchNorm"): for every output location the conv
// taps and the patch norm n2 = sum_tap x^2 come from the same loads, then
//   y = (sum_tap w_tap x_tap + b') * (rsqrt(n2 c0 + c1) c2 + c3) + post.
// Zero padding is handled at the borders (rows outside the input are skipped; columns come from a zero-padded,
// stride-phase-split copy of one plane that stays in the cache), any kernel size, stride and dilation; NCHW,
// float32 / float64. Parallel over (sample, input channel) planes, vectorised over output columns.
#include "patchnorm.h"

namespace normswap_native::patchnorm {
namespace {

template <typename T>
void depthwise_impl(const at::Tensor& x, const at::Tensor& w, const T* bias, const T* post, const Window& g,
                    const Factor<T>& factor, at::Tensor& out) {
  const int64_t N = x.size(0), C = x.size(1), mult = w.size(0) / C, taps = g.kh * g.kw;
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    Staged<T> s(g);
    std::vector<Vec<T>> wv(taps);
    for (int64_t p = begin; p < end; ++p) {
      s.load(xp + p * g.H * g.W);
      const int64_t n = p / C, c = p % C;
      for (int64_t j = 0; j < mult; ++j) {
        const int64_t oc = c * mult + j;
        for (int64_t t = 0; t < taps; ++t) wv[t] = Vec<T>(wp[oc * taps + t]);
        const Vec<T> b(bias ? bias[oc] : T(0)), a(post ? post[oc] : T(0));
        T* o = op + (n * C * mult + oc) * g.Ho * g.Wo;
        for (int64_t oy = 0; oy < g.Ho; ++oy)
          window_row<T, Sum::kConv>(s, g, oy, wv.data(), b, a, &factor, o + oy * g.Wo);
      }
    }
  });
}

// x (N, C, H, W); weight (C m, 1, kh, kw), the gain-scaled W'; bias b' (C m) or None; post (C m) or None;
// pad: the zero padding before (rows, columns); out_size (Ho, Wo); coef (c0, c1, c2, c3).
at::Tensor depthwise(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& post, c10::IntArrayRef stride, c10::IntArrayRef pad,
                     c10::IntArrayRef dilation, c10::IntArrayRef out_size, c10::ArrayRef<double> coef) {
  check_input(x, "x");
  check_coef(coef);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(0) % x.size(1) == 0 &&
                  weight.is_contiguous() && weight.scalar_type() == x.scalar_type(),
              "patchnorm_depthwise: weight is a contiguous (C m, 1, kh, kw) tensor of x's dtype");
  TORCH_CHECK(out_size.size() == 2, "patchnorm_depthwise: out_size has 2 values");
  for (const auto* t : {&bias, &post}) {
    TORCH_CHECK(!t->has_value() || ((*t)->is_contiguous() && (*t)->numel() == weight.size(0) &&
                                    (*t)->scalar_type() == x.scalar_type()),
                "patchnorm_depthwise: bias and post have one value per output channel, x's dtype");
  }
  const Window g({weight.size(2), weight.size(3)}, stride, pad, dilation, x.size(2), x.size(3), out_size[0],
                 out_size[1]);
  at::Tensor out = at::empty({x.size(0), weight.size(0), g.Ho, g.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "patchnorm_depthwise", [&] {
    depthwise_impl<scalar_t>(x, weight, bias ? bias->const_data_ptr<scalar_t>() : nullptr,
                             post ? post->const_data_ptr<scalar_t>() : nullptr, g, Factor<scalar_t>(coef), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(normswap_native, m) {
  m.def("patchnorm_depthwise(Tensor x, Tensor weight, Tensor? bias, Tensor? post, int[] stride, int[] pad, "
        "int[] dilation, int[] out_size, float[] coef) -> Tensor",
        &depthwise);
}

}  // namespace normswap_native::patchnorm
