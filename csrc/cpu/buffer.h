// Per-thread scratch of the CPU kernels: 64-byte aligned, grown on demand, never shrunk.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <new>

namespace dk {

template <typename T>
struct Buf {
  T* p = nullptr;
  size_t n = 0;
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p); }
  T* get(size_t m) {
    if (m > n) {
      std::free(p);
      size_t bytes = ((std::max<size_t>(m, 1) * sizeof(T) + 63) / 64) * 64;
      p = static_cast<T*>(std::aligned_alloc(64, bytes));
      if (!p) throw std::bad_alloc();
      n = m;
    }
    return p;
  }
};

}  // namespace dk
