// Block-wise quantized moments in the fused step (jadam._quant's "q8"/"q4"
// block formats): codes (uint8; 4-bit codes two per byte, the high nibble
// first) that index a sorted code map, times one float32 absmax per block.
// Decode and Encode are jadam._quant.decode / encode and
// jadam._codes.nearest, operation for operation in float32, so the kernel's
// codes and scales are bit for bit those of a NumPy float32 evaluation
// (tests/_np_quant.py). Rank-1 normalization: adam_rank1.h.

#ifndef JADAM_KERNEL_ADAM_QUANT_H_
#define JADAM_KERNEL_ADAM_QUANT_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "adam_rule.h"

namespace jadam {

constexpr int64_t kMaxQBlock = 4096;  // the largest block size jadam.Quantized allows

// One format, from the handler's attributes (see _ffi.py's _qformats).
struct QFormat {
  int64_t bits = 8, block = 256;
  bool dynamic = true, is_signed = true;
  const float* table = nullptr;   // 2**bits sorted values
  const float* thresh = nullptr;  // dynamic: bits thresholds (zero, decades, one)
  const float* scale = nullptr;   // dynamic: bits - 1 decade scales
};

typedef uint32_t __attribute__((may_alias)) Bits;  // a float's bits, read in place

// Per thread scratch of the encoding.
struct QScratch {
  alignas(64) float x[kMaxQBlock];
  alignas(64) uint8_t idx[kMaxQBlock];
};

// jnp.round (half to even) of v clamped to [lo, hi] (|lo|, |hi| < 2**22),
// then clamped to [lo + 1, hi - 1]: adding and subtracting 1.5 * 2**23 rounds
// to an integer, ties to even, in float32 (no contraction, no fast-math); the
// first clamp keeps infinities out. NaN stays NaN.
inline float RoundClip(float v, float lo, float hi) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2**23
  v = std::min(std::max(v, lo), hi);
  v = (v + kMagic) - kMagic;
  return std::min(std::max(v, lo + 1.0f), hi - 1.0f);
}

// c ? a : b as a bit mask: GCC turns a chain of `c ? a : b` on one integer
// into branches (and then the loop does not vectorize); this stays a select.
inline float Blend(bool c, float a, float b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  uint32_t ua, ub;
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  const uint32_t r = (ua & mask) | (ub & ~mask);
  float out;
  std::memcpy(&out, &r, 4);
  return out;
}

// _codes.nearest for the dynamic map with kDecades decades: per element,
// the group (0: zero, d + 1: decade d, kDecades + 1: one) from the
// thresholds, the decade's scale, levels and offset by selects, the level
// within the decade, and the code. The compares and selects are expanded
// from index sequences (no inner loops), so the loop over elements vectorizes.
template <int kDecades, bool kSigned, int... kT, int... kD>
void NearestDynamicImpl(const QFormat& f, const float* __restrict x, int64_t n,
                        uint8_t* __restrict out, std::integer_sequence<int, kT...>,
                        std::integer_sequence<int, kD...>) {
  constexpr int32_t kUnit = kSigned ? 1 : 2;  // levels of the lowest decade
  const float th[] = {f.thresh[kT]...};       // kDecades + 1 thresholds
  const float sc[] = {f.scale[kD]..., 0.0f};  // decade d's scale, count, count / 0.9, offset
  const float cnt[] = {static_cast<float>(kUnit << kD)..., 0.0f};
  const float per[] = {(static_cast<float>(kUnit << kD) / 0.9f)..., 0.0f};
  const float off[] = {static_cast<float>((kUnit << kD) - kUnit)..., 0.0f};
  const float total = static_cast<float>((kUnit << kDecades) - kUnit);
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    const int32_t group = ((a > th[kT] ? 1 : 0) + ...);
    float scale = sc[0], count = cnt[0], ratio = per[0], offset = off[0];
    // Decade clip(group - 1, 0, kDecades - 1): the last d < kDecades with group > d.
    ((scale = Blend(kD > 0 && group > kD, sc[kD], scale)), ...);
    ((count = Blend(kD > 0 && group > kD, cnt[kD], count)), ...);
    ((ratio = Blend(kD > 0 && group > kD, per[kD], ratio)), ...);
    ((offset = Blend(kD > 0 && group > kD, off[kD], offset)), ...);
    const float j = RoundClip((a / scale - 0.1f) * ratio - 0.5f, -1.0f, count);
    const float rank = group == 0 ? 0.0f : 1.0f + offset + j;  // NaN: group 0
    const float positive = group > kDecades ? total + 1.0f : rank;
    // Signed: [-largest .. -smallest, 0, smallest .. largest, 1].
    const float r = !kSigned ? positive
                             : (x[i] >= 0.0f ? total + positive : total - std::min(rank, total));
    out[i] = static_cast<uint8_t>(static_cast<int32_t>(r));
  }
}

template <int kDecades, bool kSigned>
void NearestDynamic(const QFormat& f, const float* x, int64_t n, uint8_t* out) {
  NearestDynamicImpl<kDecades, kSigned>(f, x, n, out,
                                        std::make_integer_sequence<int, kDecades + 1>(),
                                        std::make_integer_sequence<int, kDecades>());
}

// _codes.nearest for the linear maps: round((x + 1) * (n - 1) / 2) or
// round(x * n) - 1, clipped to [0, n - 1]; XLA converts NaN to 0.
template <bool kSigned>
void NearestLinear(float size, const float* __restrict x, int64_t n, uint8_t* __restrict out) {
  const float half = (size - 1.0f) / 2.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = kSigned ? RoundClip((x[i] + 1.0f) * half, -1.0f, size)
                            : RoundClip(x[i] * size, 0.0f, size + 1.0f) - 1.0f;
    out[i] = static_cast<uint8_t>(static_cast<int32_t>(v == v ? v : 0.0f));
  }
}

// _codes.nearest of n normalized values: the indices of their codes.
void Nearest(const QFormat& f, const float* x, int64_t n, uint8_t* out) {
  if (!f.dynamic) {
    const float size = static_cast<float>(int64_t{1} << f.bits);
    return f.is_signed ? NearestLinear<true>(size, x, n, out)
                       : NearestLinear<false>(size, x, n, out);
  }
  if (f.bits == 8) {
    return f.is_signed ? NearestDynamic<7, true>(f, x, n, out)
                       : NearestDynamic<7, false>(f, x, n, out);
  }
  return f.is_signed ? NearestDynamic<3, true>(f, x, n, out)
                     : NearestDynamic<3, false>(f, x, n, out);
}

// Elements at .. at + n of a quantized moment as float32: table[code] * absmax
// (`at` a multiple of the block size).
void Decode(const QFormat& f, const uint8_t* codes, const float* scales, int64_t at,
            int64_t n, float* __restrict dst) {
  const float* __restrict table = f.table;
  for (int64_t b = 0; b < n; b += f.block) {
    const int64_t m = std::min(f.block, n - b);
    const float s = scales[(at + b) / f.block];
    if (f.bits == 8) {
      const uint8_t* __restrict c = codes + at + b;
      for (int64_t i = 0; i < m; ++i) dst[b + i] = table[c[i]] * s;
    } else {
      const uint8_t* __restrict c = codes + ((at + b) >> 1);
      for (int64_t i = 0; i + 1 < m; i += 2) {
        dst[b + i] = table[c[i >> 1] >> 4] * s;
        dst[b + i + 1] = table[c[i >> 1] & 15] * s;
      }
      if (m & 1) dst[b + m - 1] = table[c[(m - 1) >> 1] >> 4] * s;
    }
  }
}

// Encodes n values (elements at ..; `at` a multiple of the block size, n a
// multiple of it except at the tensor's end, whose last block is padded with
// zeros as _quant.encode pads it): per block its absmax (NaN if the block
// holds one), then the nearest code of each value over it (0 where the absmax
// is not positive).
void Encode(const QFormat& f, const float* src, int64_t at, int64_t n, uint8_t* codes,
            float* scales, QScratch& S) {
  const int64_t padded = (n + f.block - 1) / f.block * f.block;
  float* __restrict x = S.x;
  for (int64_t b = 0; b < n; b += f.block) {
    const int64_t m = std::min(f.block, n - b);
    // |x| as integers: the same order, NaN above inf (jnp.max propagates NaN).
    const Bits* __restrict u = reinterpret_cast<const Bits*>(src + b);
    uint32_t top = 0;
    for (int64_t i = 0; i < m; ++i) top = std::max(top, u[i] & 0x7fffffffu);
    float absmax;
    std::memcpy(&absmax, &top, 4);
    scales[(at + b) / f.block] = absmax;
    if (absmax > 0.0f) {
      for (int64_t i = 0; i < m; ++i) x[b + i] = src[b + i] / absmax;
    } else {
      std::fill(x + b, x + b + m, 0.0f);
    }
    std::fill(x + b + m, x + b + f.block, 0.0f);
  }
  Nearest(f, x, padded, S.idx);
  if (f.bits == 8) {
    std::memcpy(codes + at, S.idx, padded);
  } else {
    uint8_t* __restrict out = codes + (at >> 1);
    for (int64_t i = 0; i < padded; i += 2) {
      out[i >> 1] = static_cast<uint8_t>((S.idx[i] << 4) | S.idx[i + 1]);
    }
  }
}

// ------------------------------------------------------------- buffers

// A moment: a float buffer (float32 / bfloat16 / float16, in place), or codes
// and block scales of a quantized format (`q` set), decoded and encoded again.
struct Moment {
  const void* in = nullptr;  // a float moment's first element (of this leaf)
  void* out = nullptr;
  ffi::DataType t = ffi::DataType::F32;
  const QFormat* q = nullptr;
  const uint8_t* codes_in = nullptr;
  uint8_t* codes = nullptr;
  const float* scales_in = nullptr;
  float* scales = nullptr;
};

// The formats of quantized moments: per format, ints (bits, block size,
// dynamic, signed) and floats (the table, then the dynamic map's thresholds
// and decade scales), laid out as _ffi.py's _qformats writes them.
// Empty where the attributes do not describe whole formats (the handler
// then refuses any quantized slot).
std::vector<QFormat> ReadFormats(ffi::Span<const int64_t> qint, ffi::Span<const float> qfloat) {
  std::vector<QFormat> out(qint.size() / 4);
  const float* at = qfloat.begin();
  for (size_t i = 0; i < out.size(); ++i) {
    QFormat& f = out[i];
    f.bits = qint[4 * i];
    f.block = qint[4 * i + 1];
    f.dynamic = qint[4 * i + 2] != 0;
    f.is_signed = qint[4 * i + 3] != 0;
    const bool block_ok = f.block >= 16 && f.block <= kMaxQBlock && (f.block & (f.block - 1)) == 0;
    if ((f.bits != 4 && f.bits != 8) || !block_ok ||
        qfloat.end() - at < (int64_t{1} << f.bits) + 2 * f.bits - 1) {
      return {};
    }
    f.table = at;
    f.thresh = at + (int64_t{1} << f.bits);
    f.scale = f.thresh + f.bits;
    at = f.scale + (f.bits - 1);
  }
  return out;
}

// Checks and records moment k of a leaf of n elements from its buffers.
bool ReadMoment(Moment& m, const QFormat* q, int64_t n, ffi::AnyBuffer* in, ffi::AnyBuffer& out,
                ffi::AnyBuffer* scales_in, ffi::AnyBuffer* scales_out) {
  m.q = q;
  if (q == nullptr) {
    m.in = in->untyped_data();
    m.out = out.untyped_data();
    m.t = in->element_type();
    return Supported(m.t) && out.element_type() == m.t &&
           static_cast<int64_t>(in->element_count()) == n &&
           static_cast<int64_t>(out.element_count()) == n;
  }
  const int64_t blocks = (n + q->block - 1) / q->block;
  const int64_t bytes = blocks * q->block * q->bits / 8;
  m.codes_in = static_cast<const uint8_t*>(in->untyped_data());
  m.codes = static_cast<uint8_t*>(out.untyped_data());
  m.scales_in = static_cast<const float*>(scales_in->untyped_data());
  m.scales = static_cast<float*>(scales_out->untyped_data());
  return q->block <= kMaxQBlock && in->element_type() == ffi::DataType::U8 &&
         out.element_type() == ffi::DataType::U8 &&
         scales_in->element_type() == ffi::DataType::F32 &&
         scales_out->element_type() == ffi::DataType::F32 &&
         static_cast<int64_t>(in->element_count()) == bytes &&
         static_cast<int64_t>(out.element_count()) == bytes &&
         static_cast<int64_t>(scales_in->element_count()) == blocks &&
         static_cast<int64_t>(scales_out->element_count()) == blocks;
}

// A float moment of `n` elements at element `offset` of a buffer that other
// leaves' moments share (the flat layout's packed moments, updated in place).
bool ReadPackedMoment(Moment& m, int64_t offset, int64_t n, ffi::AnyBuffer& in,
                      ffi::AnyBuffer& out) {
  m.q = nullptr;
  m.t = in.element_type();
  const int64_t size = static_cast<int64_t>(in.element_count());
  if (!Supported(m.t) || out.element_type() != m.t ||
      static_cast<int64_t>(out.element_count()) != size || offset < 0 || offset > size - n) {
    return false;
  }
  m.in = static_cast<const char*>(in.untyped_data()) + offset * Width(m.t);
  m.out = static_cast<char*>(out.untyped_data()) + offset * Width(m.t);
  return true;
}

}  // namespace jadam

#endif  // JADAM_KERNEL_ADAM_QUANT_H_
