// Rank-1 quantized moments in the fused step (jadam._quant's q4 nu on a tensor
// of two or more dimensions): codes (4 or 8 bits, packed over the whole
// tensor) times a per-element norm, the minimum over the dimensions of that
// dimension's maximum |value| (one float32 array per dimension). Decode uses
// the stored maxima; the new maxima need every new value of the tensor before
// any code is written, so the handler runs a first pass that only computes
// them (Rank1Stats), then the step, then stores them.
//
// Operation for operation jadam._quant's rank-1 decode and encode
// (_rank1_stats, _rank1_norm, jnp.max and jnp.minimum propagating NaN) in
// float32: tests/_np_quant.py is the NumPy reference.

#ifndef JADAM_KERNEL_ADAM_RANK1_H_
#define JADAM_KERNEL_ADAM_RANK1_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "adam_quant.h"
#include "adam_rule.h"

namespace jadam {

constexpr int kMaxRank1Dims = 8;

inline float MinNan(float a, float b) { return (a < b || a != a) ? a : b; }  // jnp.minimum

// The shape of a rank-1 moment and where each dimension's maxima start in a
// vector of all of them (sum of the dimensions).
struct Rank1Shape {
  int ndim = 0;
  int64_t dims[kMaxRank1Dims] = {};
  int64_t offset[kMaxRank1Dims] = {};
  int64_t total_dims = 0;
  int64_t count = 0;  // elements of the tensor; a packed buffer's rest decodes to 0

  // How many of n elements at `at` belong to the tensor.
  int64_t Live(int64_t at, int64_t n) const { return std::max<int64_t>(0, std::min(n, count - at)); }

  // Calls f(row, c, len) for the pieces of [at, at + n) within rows of the
  // last dimension (row: the index over the leading dimensions).
  template <typename F>
  void ForRows(int64_t at, int64_t n, F f) const {
    const int64_t cols = dims[ndim - 1];
    for (int64_t e = at; e < at + n;) {
      const int64_t row = e / cols, c = e - row * cols;
      const int64_t len = std::min(cols - c, at + n - e);
      f(row, c, len, e - at);
      e += len;
    }
  }

  // The minimum over the leading dimensions of their maxima at `row`'s index
  // (jadam._quant._rank1_norm's order: dimension 0 first).
  float RowPart(const float* stats, int64_t row) const {
    int64_t idx[kMaxRank1Dims];
    for (int d = ndim - 2; d >= 0; --d) {
      idx[d] = row % dims[d];
      row /= dims[d];
    }
    float v = stats[offset[0] + idx[0]];
    for (int d = 1; d < ndim - 1; ++d) v = MinNan(v, stats[offset[d] + idx[d]]);
    return v;
  }

  // Per element of [at, at + n), the norm: the leading part, then the last
  // dimension's maximum.
  void Norm(const float* stats, int64_t at, int64_t n, float* __restrict norm) const {
    const float* last = stats + offset[ndim - 1];
    ForRows(at, n, [&](int64_t row, int64_t c, int64_t len, int64_t i) {
      const float part = RowPart(stats, row);
      for (int64_t k = 0; k < len; ++k) norm[i + k] = MinNan(part, last[c + k]);
    });
  }

  // Folds |x| of [at, at + n) into `stats` (each dimension's maxima).
  void Fold(const float* __restrict x, int64_t at, int64_t n, float* stats) const {
    float* last = stats + offset[ndim - 1];
    ForRows(at, Live(at, n), [&](int64_t row, int64_t c, int64_t len, int64_t i) {
      float top = 0.0f;
      for (int64_t k = 0; k < len; ++k) {
        const float a = std::fabs(x[i + k]);
        last[c + k] = MaxNan(last[c + k], a);
        top = MaxNan(top, a);
      }
      int64_t r = row;
      for (int d = ndim - 2; d >= 0; --d) {
        float& s = stats[offset[d] + r % dims[d]];
        s = MaxNan(s, top);
        r /= dims[d];
      }
    });
  }
};

// Elements at .. at + n as float32: table[code] * norm (stored maxima).
void DecodeRank1(const QFormat& f, const Rank1Shape& r, const uint8_t* codes,
                 const float* stats, int64_t at, int64_t n, float* __restrict dst,
                 float* __restrict norm) {
  const int64_t live = r.Live(at, n);
  r.Norm(stats, at, live, norm);
  std::fill(dst + live, dst + n, 0.0f);
  const float* __restrict table = f.table;
  for (int64_t i = 0; i < live; ++i) {
    const int64_t e = at + i;
    const int code = f.bits == 8 ? codes[e] : (e & 1 ? codes[e >> 1] & 15 : codes[e >> 1] >> 4);
    dst[i] = table[code] * norm[i];
  }
}

// Encodes n values at `at` (even for 4 bits) over the new maxima: x / norm
// where the norm is positive, else 0; the nearest code of each; the last
// nibble of an odd-sized tensor is the code of 0 (_quant.encode pads with 0).
void EncodeRank1(const QFormat& f, const Rank1Shape& r, const float* src, const float* stats,
                 int64_t at, int64_t n, uint8_t* codes, float* __restrict norm, QScratch& S) {
  const int64_t live = r.Live(at, n);
  r.Norm(stats, at, live, norm);
  float* __restrict x = S.x;
  for (int64_t i = 0; i < live; ++i) {
    x[i] = norm[i] > 0.0f ? src[i] / norm[i] : 0.0f;
  }
  std::fill(x + live, x + n, 0.0f);  // a packed buffer's rest: the code of 0
  int64_t m = n;
  if (f.bits == 4 && (n & 1)) x[m++] = 0.0f;  // (only at the tensor's end: `at` is even)
  Nearest(f, x, m, S.idx);
  if (f.bits == 8) {
    std::copy(S.idx, S.idx + n, codes + at);
    return;
  }
  uint8_t* __restrict out = codes + (at >> 1);
  for (int64_t i = 0; i < m; i += 2) {
    out[i >> 1] = static_cast<uint8_t>((S.idx[i] << 4) | S.idx[i + 1]);
  }
}

// A rank-1 moment's buffers: its shape, the stored maxima (read from one
// buffer per dimension into one vector), the new ones and where they go.
struct Rank1 {
  bool on = false;
  Rank1Shape shape;
  std::vector<float> old_stats, new_stats;
  float* out[kMaxRank1Dims] = {};

  // Reads codes (in, out) and per dimension its maxima (scales[2d], the
  // input, scales[2d + 1], the output) of a moment of n elements (a tensor,
  // or a packed buffer that starts with one); false if they do not fit.
  bool Read(Moment& m, const QFormat* q, int64_t n, int ndim, ffi::AnyBuffer* in,
            ffi::AnyBuffer& codes_out, std::vector<ffi::AnyBuffer*>& scales) {
    if (ndim < 2 || ndim > kMaxRank1Dims) return false;
    on = true;
    m.q = q;
    m.codes_in = static_cast<const uint8_t*>(in->untyped_data());
    m.codes = static_cast<uint8_t*>(codes_out.untyped_data());
    shape.ndim = ndim;
    int64_t count = 1;
    for (int d = 0; d < ndim; ++d) {
      ffi::AnyBuffer* s_in = scales[2 * d];
      ffi::AnyBuffer* s_out = scales[2 * d + 1];
      if (s_in->element_type() != ffi::DataType::F32 ||
          s_out->element_type() != ffi::DataType::F32 ||
          s_in->element_count() != s_out->element_count()) {
        return false;
      }
      shape.dims[d] = static_cast<int64_t>(s_in->element_count());
      shape.offset[d] = shape.total_dims;
      shape.total_dims += shape.dims[d];
      count *= shape.dims[d];
      const float* v = static_cast<const float*>(s_in->untyped_data());
      old_stats.insert(old_stats.end(), v, v + shape.dims[d]);
      out[d] = static_cast<float*>(s_out->untyped_data());
    }
    new_stats.assign(shape.total_dims, 0.0f);
    shape.count = count;
    const int64_t bytes = (n * q->bits + 7) / 8;
    return count <= n && shape.dims[ndim - 1] > 0 && in->element_type() == ffi::DataType::U8 &&
           codes_out.element_type() == ffi::DataType::U8 &&
           static_cast<int64_t>(in->element_count()) == bytes &&
           static_cast<int64_t>(codes_out.element_count()) == bytes;
  }

  void Store() const {
    for (int d = 0; d < shape.ndim; ++d) {
      std::copy(new_stats.begin() + shape.offset[d],
                new_stats.begin() + shape.offset[d] + shape.dims[d], out[d]);
    }
  }
};

}  // namespace jadam

#endif  // JADAM_KERNEL_ADAM_RANK1_H_
