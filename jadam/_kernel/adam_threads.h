// The fused step's work split: items of elements over XLA:CPU's intra-op
// thread pool (the FFI's ThreadPool context), the calling thread taking items
// too, so a call finishes even when no pool thread is free.

#ifndef JADAM_KERNEL_ADAM_THREADS_H_
#define JADAM_KERNEL_ADAM_THREADS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "adam_quant.h"
#include "xla/ffi/api/ffi.h"

namespace jadam {

constexpr int64_t kItem = 1 << 16, kMinItem = 1 << 13;
static_assert(kMinItem % kMaxQBlock == 0 && kItem % kMinItem == 0, "items hold whole blocks");

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

// Elements per work item: kItem, or less where a call has too few elements
// to give every thread a few items (many small leaves are grouped in calls of
// about 64K elements), but never under kMinItem.
int64_t ItemSize(ffi::ThreadPool& pool, int64_t total) {
  const int64_t items = 4 * std::max<int64_t>(1, pool.num_threads() + 1);
  const int64_t item = ((total + items - 1) / items + kMaxQBlock - 1) / kMaxQBlock * kMaxQBlock;
  return std::clamp(item, kMinItem, kItem);
}

// Items of ItemSize elements over the concatenation of all leaves; f(leaf,
// begin, end) gets every piece of a leaf in the item. With `aligned`, a leaf
// starts at a multiple of kMaxQBlock in the concatenation, so that its pieces
// start at multiples of its quantization blocks (items are multiples too).
void ForEachPiece(ffi::ThreadPool& pool, const std::vector<int64_t>& sizes,
                  const std::function<void(size_t, int64_t, int64_t)>& f,
                  const std::vector<bool>* aligned = nullptr) {
  std::vector<int64_t> begins(sizes.size()), ends(sizes.size());
  int64_t total = 0;
  for (size_t j = 0; j < sizes.size(); ++j) {
    if (aligned && (*aligned)[j]) total = (total + kMaxQBlock - 1) / kMaxQBlock * kMaxQBlock;
    begins[j] = total;
    ends[j] = total += sizes[j];
  }
  const int64_t size = ItemSize(pool, total);
  ParallelFor(pool, (total + size - 1) / size, [&](int64_t item) {
    const int64_t lo = item * size, hi = std::min(total, lo + size);
    size_t j = std::upper_bound(ends.begin(), ends.end(), lo) - ends.begin();
    for (; j < sizes.size() && begins[j] < hi; ++j) {
      const int64_t b = std::max(lo, begins[j]) - begins[j];
      const int64_t e = std::min(hi, ends[j]) - begins[j];
      if (e > b) f(j, b, e);
    }
  });
}

}  // namespace jadam

#endif  // JADAM_KERNEL_ADAM_THREADS_H_
