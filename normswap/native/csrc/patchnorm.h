// PatchNorm's native kernels (patchnorm_depthwise.cpp, patchnorm_scale.cpp, patchnorm_norms.cpp): the factor, a
// 2-D window's geometry, one input plane staged for window sums, the channel sums of squares (docs/native.md,
// "PatchNorm").
#pragma once
#include <algorithm>
#include <cstring>
#include <vector>

#include "native.h"

namespace normswap_native::patchnorm {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// The per-patch factor rsqrt(n2 c0 + c1) c2 + c3 (normswap/variants/patchnorm/fused.py, `coefficients`); the
// operators check coef's size first (check_coef).
template <typename T>
struct Factor {
  Vec<T> c0, c1, c2, c3;
  explicit Factor(c10::ArrayRef<double> c) : c0(T(c[0])), c1(T(c[1])), c2(T(c[2])), c3(T(c[3])) {}
  Vec<T> operator()(const Vec<T>& n2) const { return at::vec::fmadd(at::vec::fmadd(n2, c0, c1).rsqrt(), c2, c3); }
};

// A 2-D window: kernel, stride, padding before (rows, columns), dilation, input and output sizes.
struct Window {
  int64_t kh, kw, sy, sx, pt, pl, dy, dx, H, W, Ho, Wo;
  Window(c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef pad, c10::IntArrayRef dilation,
         int64_t H_, int64_t W_, int64_t Ho_, int64_t Wo_)
      : H(H_), W(W_), Ho(Ho_), Wo(Wo_) {
    TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && pad.size() == 2 && dilation.size() == 2,
                "patchnorm: kernel, stride, pad and dilation have 2 values each");
    kh = kernel[0], kw = kernel[1], sy = stride[0], sx = stride[1], pt = pad[0], pl = pad[1];
    dy = dilation[0], dx = dilation[1];
    TORCH_CHECK(kh > 0 && kw > 0 && sy > 0 && sx > 0 && dy > 0 && dx > 0 && pt >= 0 && pl >= 0,
                "patchnorm: bad window");
    TORCH_CHECK(H > 0 && W > 0 && Ho > 0 && Wo > 0, "patchnorm: empty map");
  }
  // the kernel rows [first, last) of output row oy that fall inside the input (the others read zero padding)
  void rows(int64_t oy, int64_t& first, int64_t& last) const {
    int64_t top = oy * sy - pt;  // input row of kernel row 0
    first = top >= 0 ? 0 : (-top + dy - 1) / dy;
    last = top >= H ? 0 : top + (kh - 1) * dy < H ? kh : (H - 1 - top) / dy + 1;  // no negative division
    last = std::max(last, first);
  }
};

// One input plane (H x W), zero-padded in its columns and split into the column stride's phases: padded
// column p lives in phase p % sx at index p / sx, so the kernel column kx of every output column block is one
// contiguous (vector) load at `offset(kx) + ox`. Rows are not padded (rows outside the input are skipped).
// The buffer is thread-local and one plane large: it stays in the cache.
template <typename T>
class Staged {
 public:
  explicit Staged(const Window& g) : g_(g) {
    const int64_t L = Vec<T>::size();
    // whole vectors: the last block's lanes past Wo are read (inside the buffer), not stored
    const int64_t blocks = (g.Wo + L - 1) / L * L;
    wq_ = std::max(blocks + (g.kw - 1) * g.dx / g.sx, (g.W + g.pl) / g.sx + 1) + 1;
    buf_.assign(g.H * g.sx * wq_, T(0));
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t off = kx * g.dx;
      offsets_.push_back((off % g.sx) * wq_ + off / g.sx);
    }
  }
  void load(const T* x) {  // the padding stays zero: every load writes the same positions
    for (int64_t iy = 0; iy < g_.H; ++iy) {
      T* row = buf_.data() + iy * g_.sx * wq_;
      const T* src = x + iy * g_.W;
      if (g_.sx == 1) {
        std::memcpy(row + g_.pl, src, g_.W * sizeof(T));
      } else if (g_.sx == 2) {  // deinterleave: padded column p to phase p & 1, index p >> 1
        const int64_t L = Vec<T>::size(), odd = g_.pl & 1, m = g_.pl >> 1;
        T* evens = row + odd * wq_ + m;            // x[2j] -> p = 2j + pl
        T* odds = row + (1 - odd) * wq_ + m + odd;  // x[2j + 1] -> p = 2j + 1 + pl
        int64_t j = 0;
        for (; 2 * (j + L) <= g_.W; j += L) {
          const auto eo = at::vec::deinterleave2(Vec<T>::loadu(src + 2 * j), Vec<T>::loadu(src + 2 * j + L));
          eo.first.store(evens + j);
          eo.second.store(odds + j);
        }
        for (int64_t ix = 2 * j; ix < g_.W; ++ix) {
          const int64_t p = ix + g_.pl;
          row[(p & 1) * wq_ + (p >> 1)] = src[ix];
        }
      } else {
        for (int64_t ix = 0; ix < g_.W; ++ix) {
          const int64_t p = ix + g_.pl;
          row[(p % g_.sx) * wq_ + p / g_.sx] = src[ix];
        }
      }
    }
  }
  const T* row(int64_t iy) const { return buf_.data() + iy * g_.sx * wq_; }
  int64_t offset(int64_t kx) const { return offsets_[kx]; }

 private:
  const Window& g_;
  int64_t wq_;
  std::vector<T> buf_;
  std::vector<int64_t> offsets_;
};

// What one output row of window sums over a staged plane computes.
enum class Sum {
  kConv,       // (sum_tap w_tap t_tap + bias) * factor(sum_tap t_tap^2) + post: the depthwise layer
  kSquares,    // sum_tap t_tap^2: a depthwise layer's patch norms
  kBox,        // sum_tap t_tap: the patch norms from a plane of channel sums of squares q
  kBoxFactor,  // factor(sum_tap t_tap): the factor from q
};

template <typename T, Sum S>
inline void window_row(const Staged<T>& s, const Window& g, int64_t oy, const Vec<T>* w, const Vec<T>& bias,
                       const Vec<T>& post, const Factor<T>* factor, T* out) {
  const int64_t L = Vec<T>::size();
  int64_t first, last;
  g.rows(oy, first, last);
  for (int64_t ox = 0; ox < g.Wo; ox += L) {
    Vec<T> acc = bias, n2(T(0));
    for (int64_t ky = first; ky < last; ++ky) {
      const T* row = s.row(oy * g.sy - g.pt + ky * g.dy) + ox;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const Vec<T> t = Vec<T>::loadu(row + s.offset(kx));
        if constexpr (S == Sum::kConv) acc = at::vec::fmadd(t, w[ky * g.kw + kx], acc);
        if constexpr (S == Sum::kConv || S == Sum::kSquares) n2 = at::vec::fmadd(t, t, n2);
        else n2 = n2 + t;
      }
    }
    Vec<T> y = n2;
    if constexpr (S == Sum::kConv) y = at::vec::fmadd(acc, (*factor)(n2), post);
    if constexpr (S == Sum::kBoxFactor) y = (*factor)(n2);
    y.store(out + ox, std::min(L, g.Wo - ox));
  }
}

constexpr int64_t kBlock = 512;  // pixels per block of the channel sum: C runs of 2 KB (float32)

// q[0:len] = sum_c x[c * hw + 0:len]^2 (four channels per pass over q)
template <typename T>
inline void channel_sq_sum(const T* x, int64_t C, int64_t hw, int64_t len, T* q) {
  const int64_t L = Vec<T>::size();
  std::fill(q, q + len, T(0));
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    const T *x0 = x + c * hw, *x1 = x0 + hw, *x2 = x1 + hw, *x3 = x2 + hw;
    for (int64_t i = 0; i < len; i += L) {
      const int64_t k = std::min(L, len - i);
      const Vec<T> a = Vec<T>::loadu(x0 + i, k), b = Vec<T>::loadu(x1 + i, k);
      const Vec<T> d = Vec<T>::loadu(x2 + i, k), e = Vec<T>::loadu(x3 + i, k);
      Vec<T> s = at::vec::fmadd(a, a, Vec<T>::loadu(q + i, k));
      s = at::vec::fmadd(b, b, s);
      s = at::vec::fmadd(d, d, s);
      at::vec::fmadd(e, e, s).store(q + i, k);
    }
  }
  for (; c < C; ++c) {
    const T* x0 = x + c * hw;
    for (int64_t i = 0; i < len; i += L) {
      const int64_t k = std::min(L, len - i);
      const Vec<T> a = Vec<T>::loadu(x0 + i, k);
      at::vec::fmadd(a, a, Vec<T>::loadu(q + i, k)).store(q + i, k);
    }
  }
}

// The channel sums of squares of x (N, C, H, W) into q (N, H * W): parallel over blocks of pixels.
template <typename T>
void channel_sums(const at::Tensor& x, at::Tensor& q) {
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t blocks = (hw + kBlock - 1) / kBlock;
  const T* xp = x.const_data_ptr<T>();
  T* qp = q.mutable_data_ptr<T>();
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / blocks, p0 = (i % blocks) * kBlock;
      channel_sq_sum(xp + n * C * hw + p0, C, hw, std::min(kBlock, hw - p0), qp + n * hw + p0);
    }
  });
}

// Window sums (kBox, kBoxFactor) or sums of squares (kSquares) of every plane of src (P, H * W) into out
// (P, Ho * Wo): parallel over planes.
template <typename T, Sum S>
void box_planes(const at::Tensor& src, const Window& g, const Factor<T>* factor, at::Tensor& out) {
  const T* sp = src.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, src.numel() / (g.H * g.W), 1, [&](int64_t begin, int64_t end) {
    Staged<T> s(g);
    const Vec<T> zero(T(0));
    for (int64_t p = begin; p < end; ++p) {
      s.load(sp + p * g.H * g.W);
      for (int64_t oy = 0; oy < g.Ho; ++oy)
        window_row<T, S>(s, g, oy, nullptr, zero, zero, factor, op + (p * g.Ho + oy) * g.Wo);
    }
  });
}

inline void check_coef(c10::ArrayRef<double> coef) {
  TORCH_CHECK(coef.size() == 4, "patchnorm: coef has 4 values (c0, c1, c2, c3), got ", coef.size());
}

inline void check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.device().is_cpu(),
              "patchnorm: ", what, " is a contiguous 4-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "patchnorm: ", what, " is float32 or float64");
}

}  // namespace normswap_native::patchnorm
