// A small persistent std::thread pool for the CPU kernels (no OpenMP: torch ships its own OpenMP
// runtime and two runtimes in one process can clash).
//
// ThreadPool::instance().run(n, fn) calls fn(tid) for tid in [0, n): tid 0 on the calling thread,
// the others on pool workers, and returns when all are done (rethrowing the first exception).
// Calls are serialised. The pool is per process: a forked child builds its own.
#pragma once

#include <unistd.h>

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dk {

class ThreadPool {
 public:
  static ThreadPool& instance() {
    // Leaked on purpose: joining workers from a static destructor at interpreter exit can deadlock.
    static std::mutex mu;
    static ThreadPool* pool = nullptr;
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lk(mu);
    if (pool == nullptr || owner != getpid()) {
      pool = new ThreadPool();
      owner = getpid();
    }
    return *pool;
  }

  void run(int n, const std::function<void(int)>& fn) {
    if (n <= 1) {
      fn(0);
      return;
    }
    std::lock_guard<std::mutex> serial(run_mu_);
    {
      std::lock_guard<std::mutex> lk(mu_);
      while (static_cast<int>(threads_.size()) < n - 1) {
        int idx = static_cast<int>(threads_.size());
        uint64_t gen = gen_;
        threads_.emplace_back([this, idx, gen] { worker(idx, gen); });
        threads_.back().detach();
      }
      fn_ = &fn;
      want_ = n;
      remaining_ = n - 1;
      err_ = nullptr;
      ++gen_;
    }
    cv_.notify_all();
    try {
      fn(0);
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!err_) err_ = std::current_exception();
    }
    std::exception_ptr err;
    {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [this] { return remaining_ == 0; });
      err = err_;
      fn_ = nullptr;
    }
    if (err) std::rethrow_exception(err);
  }

 private:
  ThreadPool() = default;

  void worker(int idx, uint64_t seen) {
    for (;;) {
      const std::function<void(int)>* fn;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_ != seen; });
        seen = gen_;
        if (idx + 1 >= want_) continue;
        fn = fn_;
      }
      try {
        (*fn)(idx + 1);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!err_) err_ = std::current_exception();
      }
      std::lock_guard<std::mutex> lk(mu_);
      if (--remaining_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* fn_ = nullptr;
  uint64_t gen_ = 0;
  int want_ = 0;
  int remaining_ = 0;
  std::exception_ptr err_;
};

}  // namespace dk
