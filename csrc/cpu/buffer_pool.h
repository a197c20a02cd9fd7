// A small cache of large CPU buffers for the gradients the loss kernel writes.
//
// Why: a fresh [K, N, C] gradient of hundreds of MB comes from mmap, and its first touch
// costs a page fault per 4 KiB plus the kernel zeroing every page — measured here as ~2.5x
// the time of the kernel itself at (4, 1024, 32000). In training the previous step's
// gradient is freed before the next forward, so one cached block serves every step.
//
// How: buffers of at least kMinPooledBytes are wrapped with at::from_blob and a deleter
// that returns the block to the pool instead of to the OS; a request takes the smallest
// cached block that fits and wastes at most half of it. The pool holds at most
// ANN_KERNELS_GRAD_CACHE_MB (default 2048) of idle blocks, evicting the oldest first;
// `ann_kernels.empty_grad_cache()` frees them all.
//
// Statistics (`ann_kernels.grad_cache_stats()`): buffers handed out (every request, pooled
// or not: tests assert that no-grad calls request none), pool hits, fresh allocations.
#pragma once

#include <ATen/ATen.h>

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

 private:
  static constexpr size_t kMinPooledBytes = size_t{1} << 20;  // below 1 MiB malloc is cheap
  static constexpr size_t kAlignment = 64;                    // one cache line / AVX-512 vector

  BufferPool() {
    const char* env = std::getenv("ANN_KERNELS_GRAD_CACHE_MB");
    max_idle_bytes_ = (env ? std::strtoull(env, nullptr, 10) : 2048ull) << 20;
  }

  static size_t round_up(size_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

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
    return block;
  }

  void give_back(void* data, size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    idle_.emplace_back(data, capacity);
    idle_bytes_ += capacity;
    while (idle_bytes_ > max_idle_bytes_ && !idle_.empty()) {
      std::free(idle_.front().first);
      idle_bytes_ -= idle_.front().second;
      idle_.pop_front();
    }
  }

  std::atomic<uint64_t> handed_out_{0};
  std::atomic<uint64_t> hits_{0};
  std::mutex mutex_;
  std::deque<std::pair<void*, size_t>> idle_;
  size_t idle_bytes_ = 0;
  size_t max_idle_bytes_ = 0;
};

}  // namespace ann_kernels
