// jadam's fused multi-tensor Adam step for XLA:CPU, called through jax.ffi.
//
// One call updates any number of leaves in one pass each: per element it
// reads the gradient, the moments (and the param where weight decay or
// applying the update needs it) and writes the moments back in place (the
// outputs alias the inputs) and the update, or the new param in place.
// The arithmetic (adam_rule.h) is jadam._rule.element_update's and
// jadam._update.apply_rule's, operation for operation, each rounded to
// float32 (-ffp-contract=off). Scalars that depend on the step come in as a
// float32 array (see jadam/_kernel/_ffi.py for its layout).
//
// Leaves are processed in blocks of kBlock elements: inputs of other dtypes
// are converted into small float32 buffers (in L1), the float32 rule runs on
// them as one simple vectorizable loop, and outputs are converted back. Work
// is split in items of kItem elements over the FFI's intra-op thread pool;
// the calling thread takes items too, so the call finishes even when no pool
// thread is free.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

#include "adam_rule.h"

namespace ffi = xla::ffi;

namespace {

using namespace jadam;  // NOLINT: the rule and its constants

constexpr int64_t kItem = 1 << 16;

// ------------------------------------------------------------- threads

// Runs f(0) ... f(n - 1) over the pool and the calling thread.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& f) {
  const int64_t threads = n > 1 ? std::min<int64_t>(pool.num_threads(), n) : 0;
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
    int64_t n = 0;
    const std::function<void(int64_t)>* f = nullptr;
  };
  auto shared = std::make_shared<Shared>();
  shared->n = n;
  shared->f = &f;
  // A task that starts after all items are taken touches nothing but `shared`.
  auto work = [shared] {
    int64_t taken = 0;
    for (int64_t i; (i = shared->next.fetch_add(1)) < shared->n; ++taken) (*shared->f)(i);
    if (taken && shared->done.fetch_add(taken) + taken == shared->n) {
      std::lock_guard<std::mutex> lock(shared->mu);
      shared->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == shared->n; });
}

// Items of about kItem elements over the concatenation of all leaves; f(leaf,
// begin, end) gets every piece of a leaf in the item.
void ForEachPiece(ffi::ThreadPool& pool, const std::vector<int64_t>& sizes,
                  const std::function<void(size_t, int64_t, int64_t)>& f) {
  std::vector<int64_t> starts(sizes.size() + 1, 0);
  for (size_t j = 0; j < sizes.size(); ++j) starts[j + 1] = starts[j] + sizes[j];
  const int64_t total = starts.back();
  ParallelFor(pool, (total + kItem - 1) / kItem, [&](int64_t item) {
    const int64_t lo = item * kItem, hi = std::min(total, lo + kItem);
    size_t j = std::upper_bound(starts.begin(), starts.end(), lo) - starts.begin() - 1;
    for (; j < sizes.size() && starts[j] < hi; ++j) {
      const int64_t b = std::max(lo, starts[j]) - starts[j];
      const int64_t e = std::min(hi, starts[j + 1]) - starts[j];
      if (e > b) f(j, b, e);
    }
  });
}

// ------------------------------------------------------------- the step

struct Leaf {
  int64_t n = 0;
  ffi::AnyBuffer* g = nullptr;
  ffi::AnyBuffer* p = nullptr;
  ffi::AnyBuffer* m[3] = {nullptr, nullptr, nullptr};
  void* mo[3] = {nullptr, nullptr, nullptr};
  ffi::DataType mt[3] = {};
  void* out = nullptr;
  ffi::DataType ot = ffi::DataType::F32;
};

bool Supported(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}

// Inputs after the scalars, per leaf: g, moments..., [p]. Outputs per leaf:
// out, moments...; then (with skip) the finite flag. `mode`: 0 update, 1 new
// params (p + u), 2 direction with weight decay, float32 (LAMB's first pass).
ffi::Error AdamStep(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars,
                    ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t kind,
                    bool nesterov, int64_t n_moments, bool has_param, int64_t mode,
                    bool scale_lr, int64_t skip, ffi::Span<const int64_t> wd_offsets,
                    ffi::Span<const int64_t> wd_ranges) {
  if (scalars.element_count() != kNumScalars) {
    return ffi::Error::InvalidArgument("jadam kernel: wrong number of scalars");
  }
  const int64_t in_per = 1 + n_moments + (has_param ? 1 : 0), out_per = 1 + n_moments;
  const size_t n_leaves = args.size() / in_per;
  if (args.size() != n_leaves * in_per ||
      rets.size() != n_leaves * out_per + (skip ? 1 : 0) ||
      wd_offsets.size() != n_leaves + 1) {
    return ffi::Error::InvalidArgument("jadam kernel: wrong number of buffers");
  }
  std::vector<ffi::AnyBuffer> in_bufs, out_bufs;
  in_bufs.reserve(args.size());
  out_bufs.reserve(rets.size());
  for (size_t i = 0; i < args.size(); ++i) {
    auto b = args.get<ffi::AnyBuffer>(i);
    if (!b.has_value()) return b.error();
    in_bufs.push_back(*b);
  }
  for (size_t i = 0; i < rets.size(); ++i) {
    auto b = rets.get<ffi::AnyBuffer>(i);
    if (!b.has_value()) return b.error();
    out_bufs.push_back(**b);
  }
  std::vector<Leaf> leaves(n_leaves);
  std::vector<int64_t> sizes(n_leaves);
  for (size_t j = 0; j < n_leaves; ++j) {
    Leaf& L = leaves[j];
    L.g = &in_bufs[j * in_per];
    L.n = sizes[j] = static_cast<int64_t>(L.g->element_count());
    L.p = has_param ? &in_bufs[j * in_per + in_per - 1] : nullptr;
    ffi::AnyBuffer& o = out_bufs[j * out_per];
    L.out = o.untyped_data();
    L.ot = o.element_type();
    bool ok = Supported(L.g->element_type()) && Supported(L.ot) &&
              static_cast<int64_t>(o.element_count()) == L.n &&
              (L.p == nullptr || Supported(L.p->element_type()));
    for (int64_t k = 0; k < n_moments; ++k) {
      L.m[k] = &in_bufs[j * in_per + 1 + k];
      L.mt[k] = L.m[k]->element_type();
      L.mo[k] = out_bufs[j * out_per + 1 + k].untyped_data();
      ok = ok && Supported(L.mt[k]) && out_bufs[j * out_per + 1 + k].element_type() == L.mt[k] &&
           static_cast<int64_t>(L.m[k]->element_count()) == L.n;
    }
    if (mode == 1) ok = ok && L.p != nullptr && L.p->element_type() == L.ot;
    if (mode == 2) ok = ok && L.ot == ffi::DataType::F32;
    if (wd_offsets[j + 1] > wd_offsets[j]) ok = ok && L.p != nullptr;
    if (!ok) return ffi::Error::InvalidArgument("jadam kernel: unsupported buffers");
  }
  const float* s = scalars.typed_data();
  bool finite = skip != 2 || s[kFiniteIn] != 0.0f;
  if (skip == 1) {
    std::atomic<bool> all_finite{true};
    ForEachPiece(pool, sizes, [&](size_t j, int64_t b, int64_t e) {
      const Leaf& L = leaves[j];
      if (!IsFinite(L.g->untyped_data(), L.g->element_type(), b, e - b)) all_finite = false;
    });
    finite = all_finite;
  }
  if (skip) *static_cast<bool*>(out_bufs.back().untyped_data()) = finite;

  const DirectionFn direction = PickDirection(kind, nesterov);
  const float wd = s[kWd], neg_lr = s[kNegLr];
  ForEachPiece(pool, sizes, [&](size_t j, int64_t begin, int64_t end) {
    const Leaf& L = leaves[j];
    alignas(64) float gb[kBlock], m1b[kBlock], m2b[kBlock], m3b[kBlock], pb[kBlock];
    alignas(64) float db[kBlock], ob[kBlock];
    const int64_t* wr = wd_ranges.begin() + 2 * wd_offsets[j];
    const int64_t n_wr = wd_offsets[j + 1] - wd_offsets[j];
    for (int64_t at = begin; at < end; at += kBlock) {
      const int64_t n = std::min(kBlock, end - at);
      // With mode 1 the output is the param, updated in place.
      float* p = nullptr;
      if (mode == 1) {
        p = InOut(L.p->untyped_data(), L.out, L.ot, at, n, pb);
      } else if (n_wr > 0) {
        p = const_cast<float*>(In(L.p->untyped_data(), L.p->element_type(), at, n, pb));
      }
      if (!finite) {  // a skipped step: the moments as they are, a zero update
        if (mode == 1) {
          for (int64_t i = 0; i < n; ++i) p[i] = p[i] + 0.0f;
          Flush(p, L.out, L.ot, at, n);
        } else {
          float* out = Out(L.out, L.ot, at, ob);
          std::fill(out, out + n, 0.0f);
          Flush(out, L.out, L.ot, at, n);
        }
        continue;
      }
      const float* g = In(L.g->untyped_data(), L.g->element_type(), at, n, gb);
      float* m[3] = {m1b, m2b, m3b};
      for (int64_t k = 0; k < n_moments; ++k) {
        m[k] = InOut(L.m[k]->untyped_data(), L.mo[k], L.mt[k], at, n, m[k]);
      }
      float* d = mode == 2 ? Out(L.out, L.ot, at, ob) : db;
      direction(s, g, m[0], m[1], n_moments > 2 ? m[2] : nullptr, d, n);
      for (int64_t k = 0; k < n_moments; ++k) Flush(m[k], L.mo[k], L.mt[k], at, n);
      for (int64_t r = 0; r < n_wr; ++r) {  // decoupled weight decay, where it applies
        const int64_t lo = std::max(wr[2 * r], at), hi = std::min(wr[2 * r + 1], at + n);
        if (hi > lo) Decay(wd, p, d, lo - at, hi - at);
      }
      if (mode == 0) {
        float* out = Out(L.out, L.ot, at, ob);
        FinishUpdate(neg_lr, scale_lr, d, out, n);
        Flush(out, L.out, L.ot, at, n);
      } else if (mode == 1) {
        FinishApply(neg_lr, scale_lr, d, p, n);
        Flush(p, L.out, L.ot, at, n);
      }
    }
  });
  return ffi::Error::Success();
}

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

}  // namespace

// The two handlers are the library's only exported symbols (built with
// -fvisibility=hidden).
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* JadamAdamStep(
    XLA_FFI_CallFrame* call_frame);
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* JadamScaleStep(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JadamAdamStep, AdamStep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("kind")
                                  .Attr<bool>("nesterov")
                                  .Attr<int64_t>("n_moments")
                                  .Attr<bool>("has_param")
                                  .Attr<int64_t>("mode")
                                  .Attr<bool>("scale_lr")
                                  .Attr<int64_t>("skip")
                                  .Attr<ffi::Span<const int64_t>>("wd_offsets")
                                  .Attr<ffi::Span<const int64_t>>("wd_ranges"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JadamScaleStep, ScaleStep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<bool>("apply")
                                  .Attr<bool>("scale_lr")
                                  .Attr<ffi::Span<const int64_t>>("seg_offsets")
                                  .Attr<ffi::Span<const int64_t>>("seg_ends"));
