// LAMB's second pass in the fused step, its own XLA FFI handler (registered
// by adam_kernel.cc): the trust ratio of each segment (a parameter) times the
// direction the first pass wrote, then the learning rate, as the update or
// applied to the params in place.

#ifndef JADAM_KERNEL_ADAM_SCALE_H_
#define JADAM_KERNEL_ADAM_SCALE_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

#include "adam_rule.h"
#include "adam_threads.h"

namespace jadam {

// LAMB's second pass: u = -lr * (d * ratio[segment]), as the update or p + u.
// Inputs after scalars and ratios, per leaf: d (float32), [p]; outputs: out.
ffi::Error ScaleStep(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars,
                     ffi::Buffer<ffi::F32> ratios, ffi::RemainingArgs args,
                     ffi::RemainingRets rets, bool apply, bool scale_lr,
                     ffi::Span<const int64_t> seg_offsets, ffi::Span<const int64_t> seg_ends) {
  const int64_t in_per = apply ? 2 : 1;
  const size_t n_leaves = args.size() / in_per;
  if (args.size() != n_leaves * in_per || rets.size() != n_leaves ||
      seg_offsets.size() != n_leaves + 1 || scalars.element_count() != kNumScalars) {
    return ffi::Error::InvalidArgument("jadam kernel: wrong number of buffers");
  }
  std::vector<ffi::AnyBuffer> ds, ps, outs;
  std::vector<int64_t> sizes(n_leaves);
  for (size_t j = 0; j < n_leaves; ++j) {
    auto d = args.get<ffi::AnyBuffer>(j * in_per);
    auto o = rets.get<ffi::AnyBuffer>(j);
    if (!d.has_value()) return d.error();
    if (!o.has_value()) return o.error();
    ds.push_back(*d);
    outs.push_back(**o);
    if (apply) {
      auto p = args.get<ffi::AnyBuffer>(j * in_per + 1);
      if (!p.has_value()) return p.error();
      ps.push_back(*p);
      if (!Supported(p->element_type())) {
        return ffi::Error::InvalidArgument("jadam kernel: unsupported buffers");
      }
    }
    sizes[j] = static_cast<int64_t>(d->element_count());
    if (d->element_type() != ffi::DataType::F32 || !Supported(outs[j].element_type()) ||
        (apply && ps[j].element_type() != outs[j].element_type())) {
      return ffi::Error::InvalidArgument("jadam kernel: unsupported buffers");
    }
  }
  const float* s = scalars.typed_data();
  const float* ratio = ratios.typed_data();
  const float neg_lr = s[kNegLr];
  ForEachPiece(pool, sizes, [&](size_t j, int64_t begin, int64_t end) {
    alignas(64) float pb[kBlock], ob[kBlock], db[kBlock];
    const ffi::DataType ot = outs[j].element_type();
    void* out_base = outs[j].untyped_data();
    const float* d_base = static_cast<const float*>(ds[j].untyped_data());
    for (int64_t at = begin; at < end; at += kBlock) {
      const int64_t n = std::min(kBlock, end - at);
      // Segments of leaf j end at seg_ends[seg_offsets[j]] ... (within the leaf).
      for (int64_t k = seg_offsets[j]; k < seg_offsets[j + 1]; ++k) {
        const int64_t lo = std::max(k == seg_offsets[j] ? 0 : seg_ends[k - 1], at);
        const int64_t hi = std::min(seg_ends[k], at + n);
        for (int64_t i = lo - at; i < hi - at; ++i) db[i] = d_base[at + i] * ratio[k];
      }
      if (apply) {
        float* p = InOut(ps[j].untyped_data(), out_base, ot, at, n, pb);
        FinishApply(neg_lr, scale_lr, db, p, n);
        Flush(p, out_base, ot, at, n);
      } else {
        float* out = Out(out_base, ot, at, ob);
        FinishUpdate(neg_lr, scale_lr, db, out, n);
        Flush(out, out_base, ot, at, n);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace jadam

#endif  // JADAM_KERNEL_ADAM_SCALE_H_
