// A small cache of large CPU buffers for the gradients the loss kernel writes.
//
// Why: a fresh [K, N, C] gradient of hundreds of MB comes from mmap, and its first touch
// costs a page fault per 4 KiB plus the kernel zeroing every page — measured here as ~2.5x
// the time of the kernel itself at (4, 1024, 32000). In training the previous step's
// gradient is freed before the next forward, so one cached block serves every step.
//
// How: buffers of at least kMinPooledBytes are wrapped with at::from_blob and a deleter
// that returns the block to the pool instead of to the OS; a request takes the smallest
// cached block that fits and wastes at most half of it.
//
// Bound (docs/low_precision.md, memory notes): the idle blocks never exceed what the last
// steps actually used, i.e. the peak of pooled bytes in use (handed out, not yet freed) over
// the last kWindow requests, and never ANN_KERNELS_GRAD_CACHE_MB (a hard cap; unset = no
// extra cap, 0 = no caching). A training loop that frees each step's gradient before the
// next forward therefore keeps exactly one step's buffer idle between steps; when the
// steps shrink (smaller batch, evaluation), the surplus is freed within kWindow requests.
// Oldest blocks are evicted first; `ann_kernels.empty_grad_cache()` frees them all.
//
// Statistics (`ann_kernels.grad_cache_stats()`): buffers handed out (every request, pooled
// or not: tests assert that no-grad calls request none), pool hits, idle bytes, the current
// idle bound and the bytes in use.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>

namespace ann_kernels {

class BufferPool {
 public:
  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // leaked on purpose: deleters may run at exit
    return *pool;
  }

  // An uninitialised contiguous tensor of `sizes`, from the cache when possible.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
    handed_out_.fetch_add(1, std::memory_order_relaxed);
    if (bytes < kMinPooledBytes) return at::empty(sizes, options);
    auto [data, capacity] = take(bytes);
    if (data != nullptr) hits_.fetch_add(1, std::memory_order_relaxed);
    if (data == nullptr) {
      capacity = round_up(bytes);
      data = std::aligned_alloc(kAlignment, capacity);
      TORCH_CHECK(data != nullptr, "ann_kernels: out of memory allocating ", bytes, " bytes");
      note_in_use(capacity);
    }
    return at::from_blob(
        data, sizes, [capacity](void* ptr) { BufferPool::instance().give_back(ptr, capacity); }, options);
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& block : idle_) std::free(block.first);
    idle_.clear();
    idle_bytes_ = 0;
  }

  // (buffers handed out, of which served from the cache) since the process started.
  std::pair<uint64_t, uint64_t> counts() const {
    return {handed_out_.load(std::memory_order_relaxed), hits_.load(std::memory_order_relaxed)};
  }

  size_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return idle_bytes_;
  }

  // (idle bytes, their current bound, pooled bytes in use).
  std::array<size_t, 3> memory() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {idle_bytes_, idle_limit(), in_use_bytes_};
  }

 private:
  static constexpr size_t kMinPooledBytes = size_t{1} << 20;  // below 1 MiB malloc is cheap
  static constexpr size_t kAlignment = 64;                    // one cache line / AVX-512 vector
  static constexpr size_t kWindow = 8;                        // requests that make "the last steps"

  BufferPool() {
    const char* env = std::getenv("ANN_KERNELS_GRAD_CACHE_MB");
    hard_cap_bytes_ = env ? std::strtoull(env, nullptr, 10) << 20 : SIZE_MAX;
  }

  static size_t round_up(size_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

  // The idle bound: the peak of pooled bytes in use over the last kWindow requests, capped
  // by ANN_KERNELS_GRAD_CACHE_MB. Caller holds the mutex.
  size_t idle_limit() const {
    const size_t recent_peak = *std::max_element(recent_in_use_.begin(), recent_in_use_.end());
    return std::min(recent_peak, hard_cap_bytes_);
  }

  // Free the oldest idle blocks until the idle bytes are within the bound. Caller holds the mutex.
  void evict_to_limit() {
    const size_t limit = idle_limit();
    while (idle_bytes_ > limit && !idle_.empty()) {
      std::free(idle_.front().first);
      idle_bytes_ -= idle_.front().second;
      idle_.pop_front();
    }
  }

  // A block of `capacity` bytes goes into use (fresh or from the cache): record the bytes in
  // use for this request's slot of the window, and drop idle blocks beyond the new bound.
  void note_in_use(size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    note_in_use_locked(capacity);
  }

  void note_in_use_locked(size_t capacity) {
    in_use_bytes_ += capacity;
    recent_in_use_[next_slot_] = in_use_bytes_;
    next_slot_ = (next_slot_ + 1) % kWindow;
    evict_to_limit();
  }

  // The smallest idle block of at least `bytes` (wasting at most half of it), or nullptr.
  std::pair<void*, size_t> take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      if (it->second >= bytes && it->second <= 2 * bytes && (best == idle_.end() || it->second < best->second)) {
        best = it;
      }
    }
    if (best == idle_.end()) return {nullptr, 0};
    const auto block = *best;
    idle_bytes_ -= block.second;
    idle_.erase(best);
    note_in_use_locked(block.second);
    return block;
  }

  void give_back(void* data, size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_bytes_ -= capacity;
    idle_.emplace_back(data, capacity);
    idle_bytes_ += capacity;
    evict_to_limit();
  }

  std::atomic<uint64_t> handed_out_{0};
  std::atomic<uint64_t> hits_{0};
  std::mutex mutex_;
  std::deque<std::pair<void*, size_t>> idle_;
  size_t idle_bytes_ = 0;
  size_t in_use_bytes_ = 0;
  std::array<size_t, kWindow> recent_in_use_{};  // bytes in use after each of the last kWindow requests
  size_t next_slot_ = 0;
  size_t hard_cap_bytes_ = 0;
};

}  // namespace ann_kernels
