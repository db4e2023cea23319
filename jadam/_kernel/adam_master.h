// Master weights (jadam._master) in the fused step. The float32 value a
// bfloat16 / float16 (or float32) param stands for is the param plus its
// stored difference: a float32 (format 1), or a signed 8-bit count of 1/256
// of the param's last place (format 2, "q8"). The step adds the update to
// that master value, rounds it once to the param's dtype for the new param,
// and keeps what the rounding lost.
//
// Operation for operation jadam._master.decode, step and residual in
// float32 (tests/_np_adam.py is the NumPy reference): ulp() is frexp/ldexp's
// value, built from the float's bits (2**(e - nmant) of a normal param, the
// dtype's smallest subnormal below its smallest normal, 2**(-nmant - 1) for
// inf and NaN, whose frexp exponent is 0).

#ifndef JADAM_KERNEL_ADAM_MASTER_H_
#define JADAM_KERNEL_ADAM_MASTER_H_

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

#include "adam_quant.h"
#include "adam_rule.h"

namespace jadam {

enum MasterFormat { kNoMaster = 0, kMasterF32 = 1, kMasterQ8 = 2 };

// The last place of a param dtype: 2**-nmant, its smallest normal and
// smallest subnormal.
struct UlpOf {
  float step, smallest_normal, smallest_subnormal, nonfinite;
  explicit UlpOf(ffi::DataType t) {
    const int nmant = t == ffi::DataType::BF16 ? 7 : t == ffi::DataType::F16 ? 10 : 23;
    step = std::ldexp(1.0f, -nmant);
    smallest_normal = t == ffi::DataType::F16 ? std::ldexp(1.0f, -14) : std::ldexp(1.0f, -126);
    smallest_subnormal = smallest_normal * step;
    nonfinite = std::ldexp(1.0f, -nmant - 1);
  }
  // The spacing at |v|, v a value of the param's dtype (as float32).
  inline float operator()(float v) const {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    const uint32_t e = u & 0x7f800000u;  // 2**exponent, as a float's bits
    float pow2;
    std::memcpy(&pow2, &e, 4);
    const float a = std::fabs(v);
    const float normal = e == 0x7f800000u ? nonfinite : pow2 * step;
    return Blend(a < smallest_normal, smallest_subnormal, normal);
  }
};

inline float RoundTo(ffi::DataType t, float x) {
  if (t == ffi::DataType::BF16) return Bf16ToF32(F32ToBf16(x));
  if (t == ffi::DataType::F16) return static_cast<float>(static_cast<_Float16>(x));
  return x;
}

// pm = the float32 master values of n params p (float32 values of dtype pt)
// whose master state starts at element `at` (jadam._master.decode).
void DecodeMaster(int64_t fmt, ffi::DataType pt, const float* __restrict p, const void* state,
                  int64_t at, int64_t n, float* __restrict pm) {
  if (fmt == kMasterF32) {
    const float* s = static_cast<const float*>(state) + at;
    for (int64_t i = 0; i < n; ++i) pm[i] = p[i] + s[i];
    return;
  }
  const int8_t* q = static_cast<const int8_t*>(state) + at;
  const UlpOf ulp(pt);
  for (int64_t i = 0; i < n; ++i) pm[i] = p[i] + static_cast<float>(q[i]) * (ulp(p[i]) / 256.0f);
}

template <ffi::DataType kT, int64_t kFmt>
void MasterStepImpl(const float* __restrict p, const float* __restrict pm,
                    const float* __restrict u, float* __restrict change,
                    float* __restrict applied, void* state, int64_t at, int64_t n) {
  const UlpOf ulp(kT);
  float* s = static_cast<float*>(state) + at;
  int8_t* q = static_cast<int8_t*>(state) + at;
  for (int64_t i = 0; i < n; ++i) {
    const float master = pm[i] + u[i];
    const float c = RoundTo(kT, master) - p[i];
    const float a = RoundTo(kT, p[i] + c);
    const float lost = master - a;
    change[i] = c;
    applied[i] = a;
    if (kFmt == kMasterF32) {
      s[i] = lost;
    } else {  // round half to even, clip to [-128, 127]; NaN gives 0, as XLA converts it
      const float r = RoundClip(lost / ulp(a) * 256.0f, -129.0f, 128.0f);
      q[i] = static_cast<int8_t>(static_cast<int32_t>(Blend(r == r, r, 0.0f)));
    }
  }
}

// The master step (jadam._master.step) of n params p of dtype pt, from their
// master values pm and updates u: the new master value pm + u; `change`, the
// param's change (float32: the update jadam returns); `applied`, the new
// param (p + change rounded to pt); and the state: what `applied` lacks of
// the master value, written in place from element `at`.
void MasterStep(int64_t fmt, ffi::DataType pt, const float* p, const float* pm, const float* u,
                float* change, float* applied, void* state, int64_t at, int64_t n) {
  const bool f32 = fmt == kMasterF32;
  if (pt == ffi::DataType::BF16) {
    (f32 ? MasterStepImpl<ffi::DataType::BF16, kMasterF32>
         : MasterStepImpl<ffi::DataType::BF16, kMasterQ8>)(p, pm, u, change, applied, state, at, n);
  } else if (pt == ffi::DataType::F16) {
    (f32 ? MasterStepImpl<ffi::DataType::F16, kMasterF32>
         : MasterStepImpl<ffi::DataType::F16, kMasterQ8>)(p, pm, u, change, applied, state, at, n);
  } else {
    (f32 ? MasterStepImpl<ffi::DataType::F32, kMasterF32>
         : MasterStepImpl<ffi::DataType::F32, kMasterQ8>)(p, pm, u, change, applied, state, at, n);
  }
}

// Whether a master state buffer `in` / `out` fits n elements of format fmt.
inline bool MasterFits(int64_t fmt, const ffi::AnyBuffer& in, const ffi::AnyBuffer& out,
                       int64_t n) {
  const ffi::DataType t = fmt == kMasterF32 ? ffi::DataType::F32 : ffi::DataType::S8;
  return in.element_type() == t && out.element_type() == t &&
         static_cast<int64_t>(in.element_count()) == n &&
         static_cast<int64_t>(out.element_count()) == n;
}

}  // namespace jadam

#endif  // JADAM_KERNEL_ADAM_MASTER_H_
