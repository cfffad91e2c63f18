// PatchNorm's factor applied to a dense (groups = 1) conv's output, in place (docs/native.md, "PatchNorm"):
//   v <- v * (rsqrt(n2 c0 + c1) c2 + c3) + post,   n2 = the sum of x^2 over the channels and the conv's window.
// The conv itself stays torch's. A 1x1 unpadded stride-1 conv is one pass over x (the channel sum of a block
// of pixels, kept in the cache, turned into the factor) and one over v. Any other window sums x^2 over the
// channels into a one-channel map q (one pass over x), box-filters q into the factor map (window sums over a
// staged plane, as the depthwise kernel does), and scales v (one pass). NCHW, float32 / float64.
#include "patchnorm.h"

namespace normswap_native::patchnorm {
namespace {

// v[o * hw + 0:len] <- v * f + post[o] for every output channel o
template <typename T>
void scale_rows(T* v, int64_t O, int64_t hw, int64_t len, const T* f, const T* post) {
  const int64_t L = Vec<T>::size();
  for (int64_t o = 0; o < O; ++o) {
    T* row = v + o * hw;
    const Vec<T> a(post ? post[o] : T(0));
    for (int64_t i = 0; i < len; i += L) {
      const int64_t k = std::min(L, len - i);
      at::vec::fmadd(Vec<T>::loadu(row + i, k), Vec<T>::loadu(f + i, k), a).store(row + i, k);
    }
  }
}

template <typename T>
void pointwise_impl(at::Tensor& v, const at::Tensor& x, const T* post, const Factor<T>& factor) {
  const int64_t N = x.size(0), C = x.size(1), O = v.size(1), hw = x.size(2) * x.size(3);
  const int64_t blocks = (hw + kBlock - 1) / kBlock, L = Vec<T>::size();
  const T* xp = x.const_data_ptr<T>();
  T* vp = v.mutable_data_ptr<T>();
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> f(kBlock);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / blocks, p0 = (i % blocks) * kBlock, len = std::min(kBlock, hw - p0);
      channel_sq_sum(xp + n * C * hw + p0, C, hw, len, f.data());
      for (int64_t j = 0; j < len; j += L) {
        const int64_t k = std::min(L, len - j);
        factor(Vec<T>::loadu(f.data() + j, k)).store(f.data() + j, k);
      }
      scale_rows(vp + n * O * hw + p0, O, hw, len, f.data(), post);
    }
  });
}

template <typename T>
void windowed_impl(at::Tensor& v, const at::Tensor& x, const T* post, const Window& g, const Factor<T>& factor) {
  const int64_t N = x.size(0), O = v.size(1), ohw = g.Ho * g.Wo;
  at::Tensor q = at::empty({N, g.H * g.W}, x.options()), f = at::empty({N, ohw}, x.options());
  channel_sums<T>(x, q);
  box_planes<T, Sum::kBoxFactor>(q, g, &factor, f);
  const T* fp = f.const_data_ptr<T>();
  T* vp = v.mutable_data_ptr<T>();
  const int64_t oblocks = (ohw + kBlock - 1) / kBlock;
  at::parallel_for(0, N * oblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / oblocks, p0 = (i % oblocks) * kBlock;
      scale_rows(vp + n * O * ohw + p0, O, ohw, std::min(kBlock, ohw - p0), fp + n * ohw + p0, post);
    }
  });
}

// v (N, O, Ho, Wo), the conv's output (with b'), scaled in place; x (N, C, H, W), the conv's input; the
// window's kernel, stride, zero padding before (rows, columns) and dilation; coef (c0, c1, c2, c3); post (O).
at::Tensor scale_(at::Tensor v, const at::Tensor& x, c10::IntArrayRef kernel, c10::IntArrayRef stride,
                  c10::IntArrayRef pad, c10::IntArrayRef dilation, c10::ArrayRef<double> coef,
                  const std::optional<at::Tensor>& post) {
  check_input(x, "x");
  check_input(v, "v");
  check_coef(coef);
  TORCH_CHECK(v.scalar_type() == x.scalar_type() && v.size(0) == x.size(0),
              "patchnorm_scale_: v is the conv output of x (its batch and dtype)");
  TORCH_CHECK(!post.has_value() || (post->is_contiguous() && post->numel() == v.size(1) &&
                                    post->scalar_type() == v.scalar_type()),
              "patchnorm_scale_: post has one value per output channel, v's dtype");
  if (v.numel() == 0) return v;
  const Window g(kernel, stride, pad, dilation, x.size(2), x.size(3), v.size(2), v.size(3));
  const bool pointwise = g.kh == 1 && g.kw == 1 && g.sy == 1 && g.sx == 1 && g.pt == 0 && g.pl == 0 &&
                         g.Ho == g.H && g.Wo == g.W;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "patchnorm_scale_", [&] {
    const scalar_t* a = post ? post->const_data_ptr<scalar_t>() : nullptr;
    if (pointwise) pointwise_impl<scalar_t>(v, x, a, Factor<scalar_t>(coef));
    else windowed_impl<scalar_t>(v, x, a, g, Factor<scalar_t>(coef));
  });
  return v;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(normswap_native, m) {
  m.def("patchnorm_scale_(Tensor(a!) v, Tensor x, int[] kernel, int[] stride, int[] pad, int[] dilation, "
        "float[] coef, Tensor? post) -> Tensor(a!)",
        &scale_);
}

}  // namespace normswap_native::patchnorm
