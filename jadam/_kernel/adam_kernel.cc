// jadam's fused multi-tensor Adam step for XLA:CPU, called through jax.ffi.
//
// One call updates any number of leaves in one pass each: per element it
// reads the gradient, the moments (and the param where weight decay, master
// weights or applying the update needs it) and writes the moments (and the
// master weights' state, adam_master.h) back in place (the outputs alias the
// inputs) and the update, or the new param in place.
// The arithmetic (adam_rule.h) is jadam._rule.element_update's and
// jadam._update.apply_rule's, operation for operation, each rounded to
// float32 (-ffp-contract=off). Scalars that depend on the step come in as a
// float32 array (see jadam/_kernel/_ffi.py for its layout).
//
// Leaves are processed in blocks of kBlock elements (or of a quantized
// moment's block size, adam_quant.h): inputs of other dtypes are converted
// into small float32 buffers (in L1), the float32 rule runs on them as one
// simple vectorizable loop, and outputs are converted back. Work is split
// over XLA's intra-op threads (adam_threads.h).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#include "adam_master.h"
#include "adam_quant.h"
#include "adam_rank1.h"
#include "adam_rule.h"
#include "adam_scale.h"
#include "adam_threads.h"

namespace ffi = xla::ffi;

namespace {

using namespace jadam;  // NOLINT: the rule and its constants

// ------------------------------------------------------------- the step

struct Leaf {
  int64_t n = 0;
  int64_t block = kBlock;  // elements per block: kBlock, or a larger quantization block
  ffi::AnyBuffer* g = nullptr;
  ffi::AnyBuffer* p = nullptr;
  Moment m[3];
  Rank1 r1[3];  // a rank-1 quantized moment's shape and maxima
  ffi::AnyBuffer* master = nullptr;  // master weights' state, in place
  void* master_out = nullptr;
  void* out = nullptr;
  ffi::DataType ot = ffi::DataType::F32;
};

// Per thread: float32 scratch for one block of every operand.
struct Scratch {
  alignas(64) float g[kMaxQBlock], m[3][kMaxQBlock], p[kMaxQBlock], d[kMaxQBlock],
      o[kMaxQBlock], pm[kMaxQBlock], norm[kMaxQBlock];
  QScratch q;
};

// This thread's scratch (one per thread, shared by the handler's passes).
Scratch& ThreadScratch() {
  static thread_local Scratch scratch;
  return scratch;
}

// Inputs after the scalars, per leaf: g, per moment its buffer (or codes and
// scales), [master state], [p]. Outputs per leaf: out, per moment its buffer
// (or codes and scales), [master state]; then (with skip) the finite flag.
// `out` may alias g (the update written over the gradient: each block is read
// before its update is written). `mode`: 0 update, 1 new params (p + u), 2
// direction with weight decay, float32 (LAMB's first pass).
// `qslots`: per leaf and moment, the index of its quantized format or -1;
// `qndim`: its number of scale buffers (1 block-wise; rank-1: one per
// dimension, adam_rank1.h).
// `master`: the master weights' format (adam_master.h), 0 for none.
// `frozen_nu`: nu stays as it is (1-bit Adam after its warm-up).
// `moment_at`: {-1}, or per leaf the element offset of its moments in
// buffers that all leaves share (the flat layout's packed moments: float
// moments, disjoint ranges). The leaves then pass no moments of their own:
// after every leaf's inputs come the n_moments shared buffers, and after
// every leaf's outputs their new values (in place), before the finite flag.
ffi::Error AdamStep(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars,
                    ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t kind,
                    bool nesterov, int64_t n_moments, bool has_param, int64_t mode,
                    bool scale_lr, int64_t skip, int64_t master, bool frozen_nu,
                    ffi::Span<const int64_t> wd_offsets,
                    ffi::Span<const int64_t> wd_ranges, ffi::Span<const int64_t> qslots,
                    ffi::Span<const int64_t> qndim, ffi::Span<const int64_t> qint,
                    ffi::Span<const float> qfloat, ffi::Span<const int64_t> moment_at) {
  if (scalars.element_count() != kNumScalars) {
    return ffi::Error::InvalidArgument("jadam kernel: wrong number of scalars");
  }
  const size_t n_leaves = wd_offsets.size() - 1;
  const std::vector<QFormat> formats = ReadFormats(qint, qfloat);
  if (wd_offsets.size() == 0 || qslots.size() != n_leaves * n_moments || n_moments > 3 ||
      qndim.size() != qslots.size() ||
      (formats.empty() && qint.size() > 1) || master < kNoMaster || master > kMasterQ8 ||
      (master != kNoMaster && (!has_param || mode == 2)) ||
      moment_at.size() == 0) {
    return ffi::Error::InvalidArgument("jadam kernel: bad attributes");
  }
  const bool shared = !(moment_at.size() == 1 && moment_at[0] == -1);
  if (shared && moment_at.size() != n_leaves) {
    return ffi::Error::InvalidArgument("jadam kernel: bad attributes");
  }
  if (shared && std::any_of(qslots.begin(), qslots.end(), [](int64_t x) { return x >= 0; })) {
    return ffi::Error::InvalidArgument("jadam kernel: shared moments must be float");
  }
  size_t n_in = shared ? n_moments : 0, n_out = (skip ? 1 : 0) + (shared ? n_moments : 0);
  for (size_t j = 0; j < n_leaves; ++j) {
    n_in += 1 + (has_param ? 1 : 0);
    n_out += 1;
    for (int64_t k = 0; k < n_moments; ++k) {
      const int64_t slot = qslots[j * n_moments + k];
      if (slot >= static_cast<int64_t>(formats.size())) {
        return ffi::Error::InvalidArgument("jadam kernel: bad quantized format");
      }
      const int64_t nd = qndim[j * n_moments + k];
      if (slot >= 0 && (nd < 1 || nd > kMaxRank1Dims)) {
        return ffi::Error::InvalidArgument("jadam kernel: bad quantized format");
      }
      if (!shared) {
        n_in += slot < 0 ? 1 : 1 + nd;
        n_out += slot < 0 ? 1 : 1 + nd;
      }
    }
    n_in += master != kNoMaster;
    n_out += master != kNoMaster;
  }
  if (args.size() != n_in || rets.size() != n_out) {
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
  std::vector<bool> aligned(n_leaves, false);
  size_t at_in = 0, at_out = 0;
  // The shared moments' buffers, and the leaves' ranges in them (disjoint:
  // threads write them at once).
  const size_t shared_in = args.size() - (shared ? n_moments : 0);
  const size_t shared_out = rets.size() - (skip ? 1 : 0) - (shared ? n_moments : 0);
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (size_t j = 0; j < n_leaves; ++j) {
    Leaf& L = leaves[j];
    L.g = &in_bufs[at_in++];
    L.n = sizes[j] = static_cast<int64_t>(L.g->element_count());
    ffi::AnyBuffer& o = out_bufs[at_out++];
    L.out = o.untyped_data();
    L.ot = o.element_type();
    bool ok = Supported(L.g->element_type()) && Supported(L.ot) &&
              static_cast<int64_t>(o.element_count()) == L.n;
    for (int64_t k = 0; k < n_moments; ++k) {
      const int64_t slot = qslots[j * n_moments + k];
      const QFormat* q = slot < 0 ? nullptr : &formats[slot];
      const int64_t nd = q ? qndim[j * n_moments + k] : 0;
      if (shared) {
        ok = ok && ReadPackedMoment(L.m[k], moment_at[j], L.n, in_bufs[shared_in + k],
                                    out_bufs[shared_out + k]);
        continue;
      }
      ffi::AnyBuffer* in = &in_bufs[at_in++];
      ffi::AnyBuffer& out = out_bufs[at_out++];
      if (nd >= 2) {  // rank-1: codes, then one buffer of maxima per dimension
        std::vector<ffi::AnyBuffer*> scales;
        for (int64_t d = 0; d < nd; ++d) {
          scales.push_back(&in_bufs[at_in++]);
          scales.push_back(&out_bufs[at_out++]);
        }
        ok = ok && L.r1[k].Read(L.m[k], q, L.n, static_cast<int>(nd), in, out, scales);
      } else {
        ffi::AnyBuffer* s_in = q ? &in_bufs[at_in++] : nullptr;
        ffi::AnyBuffer* s_out = q ? &out_bufs[at_out++] : nullptr;
        ok = ok && ReadMoment(L.m[k], q, L.n, in, out, s_in, s_out);
      }
      if (q) {
        aligned[j] = true;
        L.block = std::max(L.block, q->block);
      }
    }
    if (master != kNoMaster) {
      L.master = &in_bufs[at_in++];
      ffi::AnyBuffer& mo = out_bufs[at_out++];
      L.master_out = mo.untyped_data();
      ok = ok && MasterFits(master, *L.master, mo, L.n);
    }
    L.p = has_param ? &in_bufs[at_in++] : nullptr;
    ok = ok && (L.p == nullptr || Supported(L.p->element_type()));
    if (mode == 1) ok = ok && L.p != nullptr && L.p->element_type() == L.ot;
    if (mode == 0 && master != kNoMaster) ok = ok && L.ot == ffi::DataType::F32;
    if (mode == 2) ok = ok && L.ot == ffi::DataType::F32;
    if (wd_offsets[j + 1] > wd_offsets[j]) ok = ok && L.p != nullptr;
    if (!ok) return ffi::Error::InvalidArgument("jadam kernel: unsupported buffers");
    if (shared && L.n > 0) ranges.emplace_back(moment_at[j], moment_at[j] + L.n);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) {
      return ffi::Error::InvalidArgument("jadam kernel: leaves' shared moments overlap");
    }
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

  const DirectionFn direction = PickDirection(kind, nesterov, frozen_nu);
  const float wd = s[kWd], neg_lr = s[kNegLr];
  // Rank-1 moments: their new maxima, from a first pass that computes every
  // new value and writes nothing.
  std::vector<int64_t> rank1_sizes(n_leaves, 0);
  for (size_t j = 0; j < n_leaves; ++j) {
    for (int64_t k = 0; k < n_moments; ++k) {
      if (leaves[j].r1[k].on) rank1_sizes[j] = sizes[j];
    }
  }
  if (finite && std::any_of(rank1_sizes.begin(), rank1_sizes.end(), [](int64_t x) { return x; })) {
    std::mutex merge;
    ForEachPiece(pool, rank1_sizes, [&](size_t j, int64_t begin, int64_t end) {
      Leaf& L = leaves[j];
      Scratch& S = ThreadScratch();
      std::vector<float> part[3];
      for (int64_t k = 0; k < n_moments; ++k) {
        if (L.r1[k].on) part[k].assign(L.r1[k].shape.total_dims, 0.0f);
      }
      for (int64_t at = begin; at < end; at += L.block) {
        const int64_t n = std::min(L.block, end - at);
        const float* g = In(L.g->untyped_data(), L.g->element_type(), at, n, S.g);
        for (int64_t k = 0; k < n_moments; ++k) {
          const Moment& M = L.m[k];
          if (L.r1[k].on) {
            DecodeRank1(*M.q, L.r1[k].shape, M.codes_in, L.r1[k].old_stats.data(), at, n,
                        S.m[k], S.norm);
          } else if (M.q) {
            Decode(*M.q, M.codes_in, M.scales_in, at, n, S.m[k]);
          } else {  // a copy: this pass writes nothing
            Load(static_cast<const char*>(M.in) + at * Width(M.t), M.t, n,
                 S.m[k]);
          }
        }
        direction(s, g, S.m[0], S.m[1], n_moments > 2 ? S.m[2] : nullptr, S.d, n);
        for (int64_t k = 0; k < n_moments; ++k) {
          if (L.r1[k].on) L.r1[k].shape.Fold(S.m[k], at, n, part[k].data());
        }
      }
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t k = 0; k < n_moments; ++k) {
        std::vector<float>& stats = L.r1[k].new_stats;
        for (size_t i = 0; i < part[k].size(); ++i) stats[i] = MaxNan(stats[i], part[k][i]);
      }
    }, &aligned);
  }
  ForEachPiece(pool, sizes, [&](size_t j, int64_t begin, int64_t end) {
    Leaf& L = leaves[j];
    Scratch& S = ThreadScratch();
    const int64_t* wr = wd_ranges.begin() + 2 * wd_offsets[j];
    const int64_t n_wr = wd_offsets[j + 1] - wd_offsets[j];
    for (int64_t at = begin; at < end; at += L.block) {
      const int64_t n = std::min(L.block, end - at);
      // With mode 1 the output is the param, updated in place.
      float* p = nullptr;
      if (mode == 1) {
        p = InOut(L.p->untyped_data(), L.out, L.ot, at, n, S.p);
      } else if (n_wr > 0 || master != kNoMaster) {
        p = const_cast<float*>(In(L.p->untyped_data(), L.p->element_type(), at, n, S.p));
      }
      if (!finite) {  // a skipped step: the moments as they are, a zero update
        if (mode == 1) {
          for (int64_t i = 0; i < n; ++i) p[i] = p[i] + 0.0f;
          Flush(p, L.out, L.ot, at, n);
        } else {
          float* out = Out(L.out, L.ot, at, S.o);
          std::fill(out, out + n, 0.0f);
          Flush(out, L.out, L.ot, at, n);
        }
        continue;
      }
      const float* g = In(L.g->untyped_data(), L.g->element_type(), at, n, S.g);
      float* m[3] = {S.m[0], S.m[1], S.m[2]};
      for (int64_t k = 0; k < n_moments; ++k) {
        const Moment& M = L.m[k];
        if (L.r1[k].on) {
          DecodeRank1(*M.q, L.r1[k].shape, M.codes_in, L.r1[k].old_stats.data(), at, n, m[k],
                      S.norm);
        } else if (M.q) {
          Decode(*M.q, M.codes_in, M.scales_in, at, n, m[k]);
        } else {
          m[k] = InOut(M.in, M.out, M.t, at, n, m[k]);
        }
      }
      float* d = mode == 2 ? Out(L.out, L.ot, at, S.o) : S.d;
      direction(s, g, m[0], m[1], n_moments > 2 ? m[2] : nullptr, d, n);
      for (int64_t k = 0; k < n_moments; ++k) {
        const Moment& M = L.m[k];
        if (L.r1[k].on) {
          EncodeRank1(*M.q, L.r1[k].shape, m[k], L.r1[k].new_stats.data(), at, n, M.codes,
                      S.norm, S.q);
        } else if (M.q) {
          Encode(*M.q, m[k], at, n, M.codes, M.scales, S.q);
        } else {
          Flush(m[k], M.out, M.t, at, n);
        }
      }
      // With master weights, the param is the master value (decoded before
      // the moments are written: the state is read and written in place).
      const float* pd = p;
      if (master != kNoMaster) {
        DecodeMaster(master, L.p->element_type(), p, L.master->untyped_data(), at, n, S.pm);
        pd = S.pm;
      }
      for (int64_t r = 0; r < n_wr; ++r) {  // decoupled weight decay, where it applies
        const int64_t lo = std::max(wr[2 * r], at), hi = std::min(wr[2 * r + 1], at + n);
        if (hi > lo) Decay(wd, pd, d, lo - at, hi - at);
      }
      if (master != kNoMaster) {  // the update goes to the master value
        float* u = S.g;  // scratch now: the gradient was read
        FinishUpdate(neg_lr, scale_lr, d, u, n);
        // The update is the param's change (float32); the new param, `applied`.
        float* change = mode == 0 ? Out(L.out, L.ot, at, S.o) : S.d;
        MasterStep(master, L.p->element_type(), p, pd, u, change, S.o, L.master_out, at, n);
        if (mode == 1) Store(S.o, L.ot, n, static_cast<char*>(L.out) + at * Width(L.ot));
      } else if (mode == 0) {
        float* out = Out(L.out, L.ot, at, S.o);
        FinishUpdate(neg_lr, scale_lr, d, out, n);
        Flush(out, L.out, L.ot, at, n);
      } else if (mode == 1) {
        FinishApply(neg_lr, scale_lr, d, p, n);
        Flush(p, L.out, L.ot, at, n);
      }
    }
  }, &aligned);
  if (finite) {  // the rank-1 maxima, once no code needs the stored ones
    for (Leaf& L : leaves) {
      for (int64_t k = 0; k < n_moments; ++k) {
        if (L.r1[k].on) L.r1[k].Store();
      }
    }
  }
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
                                  .Attr<int64_t>("master")
                                  .Attr<bool>("frozen_nu")
                                  .Attr<ffi::Span<const int64_t>>("wd_offsets")
                                  .Attr<ffi::Span<const int64_t>>("wd_ranges")
                                  .Attr<ffi::Span<const int64_t>>("qslots")
                                  .Attr<ffi::Span<const int64_t>>("qndim")
                                  .Attr<ffi::Span<const int64_t>>("qint")
                                  .Attr<ffi::Span<const float>>("qfloat")
                                  .Attr<ffi::Span<const int64_t>>("moment_at"));

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
