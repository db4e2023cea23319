// The arithmetic of jadam's fused Adam step, per block of elements: float32
// loads and stores of float32 / bfloat16 / float16 buffers, the rule
// (jadam._rule.element_update, operation for operation), decoupled weight
// decay and the learning rate. Included by adam_kernel.cc (the XLA FFI
// handlers), which splits the work and calls these on blocks of kBlock.
//
// Built with -ffp-contract=off: every operation is rounded to float32 as
// written, so results are bit for bit those of a float32 NumPy evaluation of
// the same expressions (tests/_np_adam.py).

#ifndef JADAM_KERNEL_ADAM_RULE_H_
#define JADAM_KERNEL_ADAM_RULE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace jadam {

namespace ffi = xla::ffi;

constexpr int64_t kBlock = 512;  // elements per block (float32 scratch in L1)

// Positions in the scalars array (kept in sync with _ffi.py's SCALARS).
enum Scalar {
  kC1, kB1, kC2, kB2, kEps, kEpsRoot, kBcMu, kBcMuNext, kBcNu, kRadamR, kRadamOn,
  kGradScale, kWd, kNegLr, kFiniteIn, kNumScalars
};
enum Kind { kAdam = 0, kAmsgrad = 1, kAdamax = 2, kRadam = 3 };

// ------------------------------------------------------------- conversions

inline float Bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t F32ToBf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

void Load(const void* src, ffi::DataType t, int64_t n, float* dst) {
  if (t == ffi::DataType::F32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (t == ffi::DataType::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToF32(s[i]);
  } else {
    const _Float16* s = static_cast<const _Float16*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
  }
}

void Store(const float* src, ffi::DataType t, int64_t n, void* dst) {
  if (t == ffi::DataType::F32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (t == ffi::DataType::BF16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = F32ToBf16(src[i]);
  } else {
    _Float16* d = static_cast<_Float16*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<_Float16>(src[i]);
  }
}

int64_t Width(ffi::DataType t) { return t == ffi::DataType::F32 ? 4 : 2; }

// A float32 view of n elements of a buffer at `at`: the buffer itself when it
// holds float32, else `scratch`, into which they were converted.
const float* In(const void* base, ffi::DataType t, int64_t at, int64_t n, float* scratch) {
  const char* p = static_cast<const char*>(base) + at * Width(t);
  if (t == ffi::DataType::F32) return reinterpret_cast<const float*>(p);
  Load(p, t, n, scratch);
  return scratch;
}

// The same for a value updated in place (an input aliased to an output):
// read from `in`, to be written to `out` (the same buffer, as XLA aliases
// them; copied first if it ever is not) and flushed with Flush.
float* InOut(const void* in, void* out, ffi::DataType t, int64_t at, int64_t n,
             float* scratch) {
  const int64_t w = Width(t);
  char* o = static_cast<char*>(out) + at * w;
  const char* i = static_cast<const char*>(in) + at * w;
  if (t != ffi::DataType::F32) {
    Load(i, t, n, scratch);
    return scratch;
  }
  if (i != o) std::memcpy(o, i, n * w);
  return reinterpret_cast<float*>(o);
}

float* Out(void* base, ffi::DataType t, int64_t at, float* scratch) {
  char* p = static_cast<char*>(base) + at * Width(t);
  return t == ffi::DataType::F32 ? reinterpret_cast<float*>(p) : scratch;
}

void Flush(const float* v, void* base, ffi::DataType t, int64_t at, int64_t n) {
  if (t != ffi::DataType::F32) Store(v, t, n, static_cast<char*>(base) + at * Width(t));
}

bool Supported(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}

inline float MaxNan(float a, float b) { return (a > b || a != a) ? a : b; }  // XLA's max

bool IsFinite(const void* base, ffi::DataType t, int64_t at, int64_t n) {
  uint32_t bad = 0;
  if (t == ffi::DataType::F32) {
    const uint32_t* s = static_cast<const uint32_t*>(base) + at;
    for (int64_t i = 0; i < n; ++i) bad |= (s[i] & 0x7f800000u) == 0x7f800000u;
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(base) + at;
    const uint16_t e = t == ffi::DataType::BF16 ? 0x7f80u : 0x7c00u;
    for (int64_t i = 0; i < n; ++i) bad |= (s[i] & e) == e;
  }
  return bad == 0;
}

// ------------------------------------------------------------- the rule

// The Adam direction of n elements (jadam._rule.element_update, float32); the
// moments are updated in place (with kFrozen, nu stays as it is: 1-bit Adam
// after its warm-up). Every operation is the rule's, in its order,
// rounded to float32 (no contraction): XLA:CPU, by contrast, contracts some
// multiply-adds into FMAs and rewrites some divisions, differently in
// different programs (see jadam/_kernel/__init__.py), so the two agree to
// float32 rounding, not bit for bit.
template <int kKind, bool kNesterov, bool kFrozen>
void Direction(const float* s, const float* __restrict g, float* __restrict m1,
               float* __restrict m2, float* __restrict m3, float* __restrict d, int64_t n) {
  const float c1 = s[kC1], b1 = s[kB1], c2 = s[kC2], b2 = s[kB2], eps = s[kEps];
  const float eps_root = s[kEpsRoot], bc_mu = s[kBcMu], bc_mu_next = s[kBcMuNext];
  const float bc_nu = s[kBcNu], r = s[kRadamR], gs = s[kGradScale];
  const bool on = s[kRadamOn] != 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * gs;
    const float mu = c1 * gi + b1 * m1[i];
    m1[i] = mu;
    if (kKind == kAdamax) {
      const float nu = kFrozen ? m2[i] : MaxNan(std::fabs(gi) + eps, b2 * m2[i]);
      m2[i] = nu;
      d[i] = (mu / bc_mu) / nu;
      continue;
    }
    const float nu = kFrozen ? m2[i] : c2 * (gi * gi) + b2 * m2[i];
    m2[i] = nu;
    const float nu_hat = nu / bc_nu;
    float denom;
    if (kKind == kAmsgrad) {
      const float nu_max = MaxNan(m3[i], nu_hat);
      m3[i] = nu_max;
      denom = std::sqrt(nu_max + eps_root) + eps;
    } else {
      denom = std::sqrt(nu_hat + eps_root) + eps;
    }
    const float mu_hat = kNesterov ? b1 * (mu / bc_mu_next) + c1 * (gi / bc_mu) : mu / bc_mu;
    if (kKind == kRadam) {
      d[i] = on ? r * mu_hat / denom : mu_hat;
    } else {
      d[i] = mu_hat / denom;
    }
  }
}

using DirectionFn = void (*)(const float*, const float*, float*, float*, float*, float*,
                             int64_t);

template <bool kFrozen>
DirectionFn Pick(int64_t kind, bool nesterov) {
  switch (kind) {
    case kAmsgrad: return Direction<kAmsgrad, false, kFrozen>;
    case kAdamax: return Direction<kAdamax, false, kFrozen>;
    case kRadam:
      return nesterov ? Direction<kRadam, true, kFrozen> : Direction<kRadam, false, kFrozen>;
    default: return nesterov ? Direction<kAdam, true, kFrozen> : Direction<kAdam, false, kFrozen>;
  }
}

DirectionFn PickDirection(int64_t kind, bool nesterov, bool frozen_nu) {
  return frozen_nu ? Pick<true>(kind, nesterov) : Pick<false>(kind, nesterov);
}

void Decay(float wd, const float* __restrict p, float* __restrict d, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) d[i] = d[i] + wd * p[i];
}

// u = -lr * d (or d), written as the update.
void FinishUpdate(float neg_lr, bool scale_lr, const float* __restrict d,
                  float* __restrict out, int64_t n) {
  if (scale_lr) {
    for (int64_t i = 0; i < n; ++i) out[i] = neg_lr * d[i];
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = d[i];
  }
}

// p + u, in place.
void FinishApply(float neg_lr, bool scale_lr, const float* __restrict d, float* __restrict p,
                 int64_t n) {
  if (scale_lr) {
    for (int64_t i = 0; i < n; ++i) p[i] = p[i] + neg_lr * d[i];
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = p[i] + d[i];
  }
}

}  // namespace jadam

#endif  // JADAM_KERNEL_ADAM_RULE_H_
