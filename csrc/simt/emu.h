// emu.h - SIMT emulation: run CUDA device code written against simt.h on the CPU, with g++.
//
// Included by simt.h when the compiler is not nvcc. Header-only (inline), so any csrc/emu/*.cpp can use it.
//
// ---------------------------------------------------------------------------------------- design
// * A launch runs the grid block by block. `G` blocks run at the same time (Config::concurrent_blocks,
//   default min(#blocks, hardware threads, 4096 / threads-per-block)); each of these G "block slots"
//   has one OS thread (std::thread) per CUDA thread, and its threads walk blocks slot, slot+G, ...
//   Between two blocks the threads of a slot meet at an end-of-block barrier; the slot's shared
//   memory is then refilled with 0xFF bytes (NaN for floats), so reads of shared memory a block did
//   not write in this block fail the tests instead of seeing the previous block's data.
// * threadIdx, blockIdx, blockDim, gridDim are thread_local variables of CUDA's names and types.
// * __syncthreads() is a generation-counting barrier (mutex + condition variable) of the block.
// * Warp intrinsics (__shfl*_sync, __syncwarp, __ballot_sync, __any_sync, __all_sync) go through a
//   per-warp exchange buffer (two halves used alternately, so one barrier per shuffle is enough)
//   and a per-warp barrier whose participants are exactly the lanes named in `mask`.
// * Threads of a warp run independently (the Volta+ model): code that relies on lock-step warps
//   without __syncwarp is as wrong here as it is on sm_70+.
// * DK_SHARED / DK_SHARED_ARRAY objects live in the block slot's arena, one slot per declaration
//   site (and template instantiation), like __shared__ variables. Static shared memory is limited to
//   48 KB and static + dynamic to Config::max_shared_bytes (default 48 KB, CUDA's limit without
//   cudaFuncAttributeMaxDynamicSharedMemorySize).
// * Launch configuration errors are checked like CUDA does (block <= 1024 threads, dims limits).
//
// --------------------------------------------------------------------- errors instead of hangs
// The emulation is stricter than the hardware: everything CUDA calls undefined is reported as a
// std::runtime_error from dk::launch (RuntimeError in Python), never a hang:
// * deadlock: every thread of a block waits in some barrier and none can complete (counted exactly,
//   reported at once with what each barrier waits for);
// * __syncthreads reached by some threads of a block after others returned from the kernel, or at
//   different call sites (file:line) by different threads of the same block;
// * a warp intrinsic whose lanes disagree on mask or call site, whose mask does not contain the
//   calling lane or names lanes that do not exist / already returned, or that reads a lane outside
//   the mask;
// * an exception thrown by device code; a barrier wait longer than Config::timeout_s (default 60 s,
//   env DITKERNELS_EMU_TIMEOUT), the backstop for a thread stuck in a loop while the others wait.
//
// ---------------------------------------------------------------------------- what it cannot model
// * inline PTX (asm), CUB / cooperative_groups block-level primitives, textures/surfaces, tensor-core
//   (mma/wgmma) intrinsics, TMA, clusters / distributed shared memory, grid-wide synchronisation,
//   cudaFuncSetAttribute, streams and events (launches are synchronous), dynamic parallelism;
// * concurrent warp intrinsics of one warp with *different disjoint* masks (diverged halves of a warp
//   shuffling at the same time): reported as a mask mismatch, not run;
// * __syncthreads_count/_and/_or, __match_*_sync, __reduce_*_sync, named barriers (bar.sync id);
// * __activemask() returns the lanes that exist and have not returned (there is no divergence
//   tracking);
// * data races in shared/global memory are not detected (threads run truly concurrently, so a missing
//   barrier often, but not always, shows up as wrong results; build the emulated code with
//   -fsanitize=thread to detect races reliably: the barriers are std::mutex/condition_variable);
// * floating point: g++ on the host (FMA contraction and fast intrinsics differ from the GPU by a few
//   ulp; __expf etc. are the accurate libm functions);
// * a thread that loops forever without calling any intrinsic cannot be interrupted (the launch waits).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

// ------------------------------------------------------------------------------- CUDA vector types
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

// ------------------------------------------------------------------------------ built-in variables
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace dk {
using stream_t = void*;

namespace emu {

struct Config {
  int concurrent_blocks = 0;     // 0: automatic
  double timeout_s = 0;          // 0: env DITKERNELS_EMU_TIMEOUT or 60 s
  bool poison_shared = true;     // fill shared memory with 0xFF at every block start
  size_t max_shared_bytes = 48 * 1024;
};

// Options for launches made from the calling (host) thread; see ScopedConfig.
inline Config& config() {
  static thread_local Config c;
  return c;
}
struct ScopedConfig {
  Config saved;
  explicit ScopedConfig(const Config& c) : saved(config()) { config() = c; }
  ~ScopedConfig() { config() = saved; }
};

// Thrown inside emulated threads to unwind them after some thread of the launch failed.
struct Aborted {};

class Launch;
class Block;

inline std::string site_str(const char* file, int line) {
  if (!file) return "<kernel return>";
  const char* base = std::strrchr(file, '/');
  return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
}

// State shared by all block slots of one launch: the first error and the abort flag.
class Launch {
 public:
  std::atomic<bool> aborted{false};
  std::chrono::steady_clock::duration timeout{};
  std::vector<Block*> blocks;

  void fail(const std::string& msg) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (message_.empty()) message_ = msg;
    }
    aborted.store(true);
  }
  std::string message() {
    std::lock_guard<std::mutex> g(mu_);
    return message_;
  }

 private:
  std::mutex mu_;
  std::string message_;
};

constexpr auto kPoll = std::chrono::milliseconds(50);

// One warp of a block slot: exchange buffer and barrier of the warp intrinsics.
class Warp {
 public:
  Block* block = nullptr;
  int index = 0;
  unsigned present = 0;  // lanes that exist (the last warp of a block may be partial)
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  uint64_t gen = 0;
  unsigned cur_mask = 0;
  const char* cur_file = nullptr;
  int cur_line = 0;
  const char* cur_op = nullptr;
  unsigned exited = 0;  // lanes that returned from the kernel in the current block
  uint64_t xbuf[2][32] = {};
};

struct ThreadCtx {
  Launch* launch = nullptr;
  Block* block = nullptr;
  Warp* warp = nullptr;
  int tid = 0;   // linear thread index in the block
  int lane = 0;
};
inline thread_local ThreadCtx* tctx = nullptr;

inline ThreadCtx& ctx() {
  if (!tctx) throw std::logic_error("ditkernels emu: CUDA intrinsic called outside an emulated kernel");
  return *tctx;
}

// One block slot: the threads, barrier and shared memory of the block currently run by it.
class Block {
 public:
  Launch* launch = nullptr;
  int slot = 0;
  int nthreads = 0;
  size_t dyn_bytes = 0;
  size_t max_bytes = 0;
  bool poison = true;
  uint3 block_idx{0, 0, 0};

  std::mutex mu;
  std::condition_variable cv;
  int sync_arrived = 0;
  uint64_t sync_gen = 0;
  const char* sync_file = nullptr;
  int sync_line = 0;
  int done = 0;
  uint64_t end_gen = 0;
  std::atomic<int> blocked{0};  // threads waiting in barriers that have not been released

  std::vector<std::unique_ptr<Warp>> warps;
  std::unordered_map<const void*, size_t> slots;
  size_t static_used = 0;
  unsigned char* arena = nullptr;

  Block(Launch* l, int slot_, int n, size_t dyn, size_t max_total, bool poison_)
      : launch(l), slot(slot_), nthreads(n), dyn_bytes(dyn), max_bytes(max_total), poison(poison_) {
    int nw = (n + 31) / 32;
    for (int w = 0; w < nw; ++w) {
      warps.emplace_back(new Warp());
      warps.back()->block = this;
      warps.back()->index = w;
      int lanes = std::min(32, n - 32 * w);
      warps.back()->present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    }
    arena = static_cast<unsigned char*>(::operator new(max_bytes + 16, std::align_val_t(128)));
    reset_memory();
  }
  ~Block() { ::operator delete(arena, std::align_val_t(128)); }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;

  size_t dyn_offset_end() const { return (dyn_bytes + 15) & ~size_t(15); }
  void reset_memory() {
    if (poison) std::memset(arena, 0xff, max_bytes + 16);
  }

  std::string where() const {
    return "block (" + std::to_string(block_idx.x) + "," + std::to_string(block_idx.y) + "," +
           std::to_string(block_idx.z) + ")";
  }

  // Describe what every barrier of this block waits for (used in deadlock / timeout reports).
  std::string describe() {
    std::string s;
    {
      std::lock_guard<std::mutex> g(mu);
      s += std::to_string(sync_arrived) + " thread(s) at __syncthreads";
      if (sync_arrived) s += " (" + site_str(sync_file, sync_line) + ")";
      s += ", " + std::to_string(done) + " returned from the kernel";
    }
    for (auto& w : warps) {
      std::lock_guard<std::mutex> g(w->mu);
      if (w->arrived) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "0x%08x", w->cur_mask);
        s += "; warp " + std::to_string(w->index) + ": " + std::to_string(w->arrived) + " lane(s) in " +
             w->cur_op + " (" + site_str(w->cur_file, w->cur_line) + ") with mask " + buf;
      }
    }
    return s + " (" + std::to_string(nthreads) + " threads)";
  }

  [[noreturn]] void fail_and_throw(const std::string& msg) {
    launch->fail("ditkernels emu: " + where() + ": " + msg);
    throw Aborted{};
  }

  // Called with the lock of the barrier being entered *released*: reports a deadlock if every
  // thread of the block now waits in an unreleased barrier.
  void note_blocked_then_check(int now_blocked) {
    if (now_blocked == nthreads)
      fail_and_throw("deadlock: every thread waits in a barrier that can never complete: " + describe());
  }

  // Wait on `cv` (with `lk` held) until `released()`; throws Aborted on abort or timeout.
  template <class Pred>
  void wait(std::unique_lock<std::mutex>& lk, std::condition_variable& c, Pred released, const char* what,
            const char* file, int line) {
    auto deadline = std::chrono::steady_clock::now() + launch->timeout;
    while (!released()) {
      if (launch->aborted.load()) throw Aborted{};
      if (std::chrono::steady_clock::now() > deadline) {
        lk.unlock();
        std::string d = describe();
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.1f", std::chrono::duration<double>(launch->timeout).count());
        fail_and_throw(std::string("timeout: a thread waited more than ") + buf + " s in " + what + " (" +
                       site_str(file, line) + "); " + d +
                       ". A thread is probably looping in device code while the others wait.");
      }
      c.wait_for(lk, kPoll);
    }
  }

  void check_abort() {
    if (launch->aborted.load()) throw Aborted{};
  }

  // A thread at a block-wide barrier whose generation counter is `gen` (`lk` holds `mu`): the block's last
  // thread to arrive (`last`) opens the next generation and wakes the others; any other one counts as blocked
  // (a deadlock when every thread is) and waits for the generation to change.
  void block_barrier(std::unique_lock<std::mutex>& lk, uint64_t& gen, bool last, const char* what, const char* file,
                     int line) {
    if (last) {
      ++gen;
      blocked.fetch_sub(nthreads - 1);
      cv.notify_all();
      return;
    }
    const uint64_t my = gen;
    const int b = blocked.fetch_add(1) + 1;
    if (b == nthreads) {
      lk.unlock();
      note_blocked_then_check(b);
    }
    wait(lk, cv, [&] { return gen != my; }, what, file, line);
  }

  void syncthreads(const char* file, int line) {
    check_abort();
    std::unique_lock<std::mutex> lk(mu);
    if (done > 0) {
      int d = done;
      lk.unlock();
      fail_and_throw("__syncthreads (" + site_str(file, line) + ") reached after " + std::to_string(d) +
                     " thread(s) of the block returned from the kernel (divergent __syncthreads)");
    }
    if (sync_arrived == 0) {
      sync_file = file;
      sync_line = line;
    } else if (sync_line != line || std::strcmp(sync_file, file) != 0) {
      std::string other = site_str(sync_file, sync_line);
      lk.unlock();
      fail_and_throw("threads wait at different __syncthreads: " + other + " and " + site_str(file, line));
    }
    const bool last = ++sync_arrived == nthreads;
    if (last) sync_arrived = 0;
    block_barrier(lk, sync_gen, last, "__syncthreads", file, line);
  }

  // A thread returned from the kernel: mark it, then wait for the whole block (end-of-block barrier).
  // The last thread resets the slot for the next block.
  void thread_done(ThreadCtx& t) {
    Warp& w = *t.warp;
    {
      std::unique_lock<std::mutex> lk(w.mu);
      w.exited |= 1u << t.lane;
      if (w.arrived && (w.cur_mask >> t.lane & 1u)) {
        std::string op = w.cur_op, site = site_str(w.cur_file, w.cur_line);
        lk.unlock();
        fail_and_throw("lane " + std::to_string(t.lane) + " of warp " + std::to_string(w.index) +
                       " returned from the kernel while its warp waits for it in " + op + " (" + site + ")");
      }
    }
    std::unique_lock<std::mutex> lk(mu);
    if (sync_arrived > 0) {
      std::string site = site_str(sync_file, sync_line);
      int a = sync_arrived;
      lk.unlock();
      fail_and_throw("thread " + std::to_string(t.tid) + " returned from the kernel while " + std::to_string(a) +
                     " thread(s) wait at __syncthreads (" + site + ") (divergent __syncthreads)");
    }
    const bool last = ++done == nthreads;
    if (last) {
      done = 0;
      for (auto& ww : warps) {
        std::lock_guard<std::mutex> g(ww->mu);
        ww->exited = 0;
      }
      reset_memory();
    }
    block_barrier(lk, end_gen, last, "the end of the block", nullptr, 0);
  }

  // Warp barrier + exchange: every lane of `mask` contributes `bits`; returns the generation's buffer.
  const uint64_t* warp_exchange(ThreadCtx& t, unsigned mask, uint64_t bits, const char* op, const char* file,
                                int line) {
    check_abort();
    Warp& w = *t.warp;
    char mbuf[16];
    std::snprintf(mbuf, sizeof mbuf, "0x%08x", mask);
    if (!(mask >> t.lane & 1u))
      fail_and_throw(std::string(op) + " (" + site_str(file, line) + "): calling lane " + std::to_string(t.lane) +
                     " is not in mask " + mbuf);
    if (mask & ~w.present)
      fail_and_throw(std::string(op) + " (" + site_str(file, line) + "): mask " + mbuf +
                     " names lanes that do not exist in warp " + std::to_string(w.index));
    std::unique_lock<std::mutex> lk(w.mu);
    if (w.exited & mask) {
      lk.unlock();
      fail_and_throw(std::string(op) + " (" + site_str(file, line) + "): mask " + mbuf +
                     " names lanes that already returned from the kernel");
    }
    if (w.arrived == 0) {
      w.cur_mask = mask;
      w.cur_file = file;
      w.cur_line = line;
      w.cur_op = op;
    } else if (w.cur_mask != mask || w.cur_line != line || std::strcmp(w.cur_file, file) != 0 ||
               std::strcmp(w.cur_op, op) != 0) {
      char obuf[16];
      std::snprintf(obuf, sizeof obuf, "0x%08x", w.cur_mask);
      std::string other = std::string(w.cur_op) + " (" + site_str(w.cur_file, w.cur_line) + ") mask " + obuf;
      lk.unlock();
      fail_and_throw("lanes of warp " + std::to_string(w.index) + " meet in different warp intrinsics: " + other +
                     " vs " + op + " (" + site_str(file, line) + ") mask " + mbuf);
    }
    uint64_t my = w.gen;
    w.xbuf[my & 1][t.lane] = bits;
    if (++w.arrived == __builtin_popcount(mask)) {
      w.arrived = 0;
      ++w.gen;
      blocked.fetch_sub(__builtin_popcount(mask) - 1);
      w.cv.notify_all();
      return w.xbuf[my & 1];
    }
    int b = blocked.fetch_add(1) + 1;
    if (b == nthreads) {
      lk.unlock();
      note_blocked_then_check(b);
    }
    wait(lk, w.cv, [&] { return w.gen != my; }, op, file, line);
    return w.xbuf[my & 1];
  }

  void* shared_slot(const void* tag, size_t size, size_t align, const char* name) {
    std::unique_lock<std::mutex> lk(mu);
    auto it = slots.find(tag);
    if (it != slots.end()) return arena + it->second;
    size_t off = (dyn_offset_end() + static_used + align - 1) / align * align;
    if (off + size - dyn_offset_end() > 48 * 1024 || off + size > max_bytes) {
      lk.unlock();
      fail_and_throw(std::string("shared memory overflow declaring '") + name + "' (" + std::to_string(size) +
                     " bytes): static " + std::to_string(off + size - dyn_offset_end()) + " B (limit 49152), " +
                     "static + dynamic " + std::to_string(off + size) + " B (limit " + std::to_string(max_bytes) + ")");
    }
    static_used = off + size - dyn_offset_end();
    slots.emplace(tag, off);
    return arena + off;
  }
};

// ------------------------------------------------------------------------------------- launching
inline double default_timeout() {
  if (const char* e = std::getenv("DITKERNELS_EMU_TIMEOUT")) {
    double v = std::atof(e);
    if (v > 0) return v;
  }
  return 60.0;
}

// Run `body` (the kernel with its arguments bound) for every thread of every block of the grid.
template <class Body>
void run_grid(dim3 grid, dim3 block, size_t dyn_smem, const Body& body) {
  const Config cfg = config();
  auto bad = [](const std::string& m) { throw std::runtime_error("ditkernels emu: invalid launch: " + m); };
  uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    bad("block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," + std::to_string(block.z) +
        ") must have 1..1024 threads, x,y <= 1024, z <= 64");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    bad("grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) +
        ") out of range");
  if (dyn_smem > cfg.max_shared_bytes)
    bad("dynamic shared memory " + std::to_string(dyn_smem) + " B > " + std::to_string(cfg.max_shared_bytes) + " B");
  uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  uint64_t hw = std::max(1u, std::thread::hardware_concurrency());
  uint64_t g = cfg.concurrent_blocks > 0 ? uint64_t(cfg.concurrent_blocks)
                                         : std::max<uint64_t>(1, std::min<uint64_t>(hw, 4096 / nthreads));
  g = std::min(g, nblocks);

  Launch launch;
  launch.timeout = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(cfg.timeout_s > 0 ? cfg.timeout_s : default_timeout()));
  std::vector<std::unique_ptr<Block>> slots;
  for (uint64_t s = 0; s < g; ++s) {
    slots.emplace_back(new Block(&launch, int(s), int(nthreads), dyn_smem,
                                 std::max(cfg.max_shared_bytes, dyn_smem), cfg.poison_shared));
    launch.blocks.push_back(slots.back().get());
  }

  auto thread_main = [&](Block* blk, int tid) {
    ThreadCtx t;
    t.launch = &launch;
    t.block = blk;
    t.tid = tid;
    t.warp = blk->warps[tid / 32].get();
    t.lane = tid % 32;
    tctx = &t;
    threadIdx = uint3{unsigned(tid % block.x), unsigned(tid / block.x % block.y), unsigned(tid / (block.x * block.y))};
    blockDim = block;
    gridDim = grid;
    try {
      for (uint64_t b = uint64_t(blk->slot); b < nblocks; b += g) {
        uint3 bi{unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y))};
        blockIdx = bi;
        if (tid == 0) {
          std::lock_guard<std::mutex> lk(blk->mu);
          blk->block_idx = bi;
        }
        blk->check_abort();
        body();
        blk->thread_done(t);
      }
    } catch (const Aborted&) {
    } catch (const std::exception& e) {
      launch.fail(std::string("ditkernels emu: device code threw: ") + e.what());
    } catch (...) {
      launch.fail("ditkernels emu: device code threw an unknown exception");
    }
    tctx = nullptr;
  };

  std::vector<std::thread> threads;
  threads.reserve(size_t(g * nthreads));
  std::string spawn_error;
  try {
    for (auto& s : slots)
      for (int tid = 0; tid < int(nthreads); ++tid) threads.emplace_back(thread_main, s.get(), tid);
  } catch (const std::exception& e) {
    spawn_error = e.what();
    launch.fail("ditkernels emu: could not start threads: " + spawn_error);
  }
  for (auto& th : threads) th.join();
  if (launch.aborted.load()) throw std::runtime_error(launch.message());
}

inline void syncthreads(const char* file, int line) {
  ThreadCtx& t = ctx();
  t.block->syncthreads(file, line);
}

inline void* shared_slot(const void* tag, size_t size, size_t align, const char* name) {
  return ctx().block->shared_slot(tag, size, align, name);
}
inline void* dynamic_shared() { return ctx().block->arena; }

// ---------------------------------------------------------------------------------- warp intrinsics
template <class T>
inline uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffled types must be <= 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

inline void check_width(int width, const char* op, const char* file, int line) {
  if (width < 1 || width > 32 || (width & (width - 1)))
    ctx().block->fail_and_throw(std::string(op) + " (" + site_str(file, line) + "): width " + std::to_string(width) +
                                " is not a power of two in 1..32");
}

// Shared tail of the shuffles: exchange, then read lane `src` (or keep the own value when src < 0).
template <class T>
inline T shfl_from(unsigned mask, T var, int src, const char* op, const char* file, int line) {
  ThreadCtx& t = ctx();
  const uint64_t* buf = t.block->warp_exchange(t, mask, to_bits(var), op, file, line);
  if (src < 0) return var;
  if (!(mask >> src & 1u)) {
    char mbuf[16];
    std::snprintf(mbuf, sizeof mbuf, "0x%08x", mask);
    t.block->fail_and_throw(std::string(op) + " (" + site_str(file, line) + "): lane " + std::to_string(t.lane) +
                            " reads lane " + std::to_string(src) + " outside mask " + mbuf);
  }
  return from_bits<T>(buf[src]);
}

template <class T>
inline T shfl_sync_at(const char* file, int line, unsigned mask, T var, int src_lane, int width = 32) {
  check_width(width, "__shfl_sync", file, line);
  int lane = ctx().lane;
  int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
  return shfl_from(mask, var, src, "__shfl_sync", file, line);
}
template <class T>
inline T shfl_up_sync_at(const char* file, int line, unsigned mask, T var, unsigned delta, int width = 32) {
  check_width(width, "__shfl_up_sync", file, line);
  int lane = ctx().lane;
  int src = (lane & (width - 1)) >= int(delta) ? lane - int(delta) : -1;
  return shfl_from(mask, var, src, "__shfl_up_sync", file, line);
}
template <class T>
inline T shfl_down_sync_at(const char* file, int line, unsigned mask, T var, unsigned delta, int width = 32) {
  check_width(width, "__shfl_down_sync", file, line);
  int lane = ctx().lane;
  int src = (lane & (width - 1)) + int(delta) < width ? lane + int(delta) : -1;
  return shfl_from(mask, var, src, "__shfl_down_sync", file, line);
}
template <class T>
inline T shfl_xor_sync_at(const char* file, int line, unsigned mask, T var, int lane_mask, int width = 32) {
  check_width(width, "__shfl_xor_sync", file, line);
  int lane = ctx().lane;
  int src = lane ^ (lane_mask & 31);
  // CUDA: lanes may read earlier width-groups, but reading a later group returns the own value.
  if (src >= (lane & ~(width - 1)) + width) src = -1;
  return shfl_from(mask, var, src, "__shfl_xor_sync", file, line);
}
inline void syncwarp_at(const char* file, int line, unsigned mask = 0xffffffffu) {
  ThreadCtx& t = ctx();
  t.block->warp_exchange(t, mask, 0, "__syncwarp", file, line);
}
struct SyncwarpSite {
  const char* file;
  int line;
  void operator()(unsigned mask = 0xffffffffu) const { syncwarp_at(file, line, mask); }
};
inline unsigned ballot_sync_at(const char* file, int line, unsigned mask, int pred, const char* op = "__ballot_sync") {
  ThreadCtx& t = ctx();
  const uint64_t* buf = t.block->warp_exchange(t, mask, pred ? 1 : 0, op, file, line);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && buf[l]) r |= 1u << l;
  return r;
}
inline unsigned activemask() {
  ThreadCtx& t = ctx();
  std::lock_guard<std::mutex> g(t.warp->mu);
  return t.warp->present & ~t.warp->exited;
}

// ------------------------------------------------------------------------------------------ atomics
template <class T>
inline T atomic_rmw(T* p, T (*op)(T, T), T v) {
  T old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  T desired;
  do {
    desired = op(old, v);
  } while (!__atomic_compare_exchange(p, &old, &desired, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
  return old;
}

}  // namespace emu

// Launch `kernel` (a plain function under emulation) on the emulated GPU; synchronous.
template <class... KArgs, class... Args>
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, stream_t /*stream*/, void (*kernel)(KArgs...),
                   Args&&... args) {
  std::tuple<std::decay_t<KArgs>...> params(static_cast<std::decay_t<KArgs>>(args)...);
  emu::run_grid(grid, block, smem_bytes, [&] {
    auto copy = params;  // every CUDA thread gets its own copy of the parameters
    std::apply(kernel, copy);
  });
}
}  // namespace dk

// ------------------------------------------------------------------------------- CUDA intrinsics
#define __syncthreads() ::dk::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::dk::emu::SyncwarpSite{__FILE__, __LINE__}(__VA_ARGS__)
#define __shfl_sync(...) ::dk::emu::shfl_sync_at(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::dk::emu::shfl_up_sync_at(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::dk::emu::shfl_down_sync_at(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::dk::emu::shfl_xor_sync_at(__FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::dk::emu::ballot_sync_at(__FILE__, __LINE__, (mask), (pred))
#define __any_sync(mask, pred) (::dk::emu::ballot_sync_at(__FILE__, __LINE__, (mask), (pred), "__any_sync") != 0u)
#define __all_sync(mask, pred) \
  (::dk::emu::ballot_sync_at(__FILE__, __LINE__, (mask), (pred), "__all_sync") == (mask))
#define __activemask() ::dk::emu::activemask()

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int v) { return ::dk::emu::from_bits<float>(uint32_t(v)); }
inline int __float_as_int(float v) { return int(uint32_t(::dk::emu::to_bits(v))); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(unsigned(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }

template <class T>
inline T atomicAdd(T* p, T v) {
  return ::dk::emu::atomic_rmw<T>(p, [](T a, T b) { return T(a + b); }, v);
}
template <class T>
inline T atomicMax(T* p, T v) {
  return ::dk::emu::atomic_rmw<T>(p, [](T a, T b) { return a < b ? b : a; }, v);
}
template <class T>
inline T atomicMin(T* p, T v) {
  return ::dk::emu::atomic_rmw<T>(p, [](T a, T b) { return b < a ? b : a; }, v);
}
template <class T>
inline T atomicExch(T* p, T v) {
  T old;
  __atomic_exchange(p, &v, &old, __ATOMIC_SEQ_CST);
  return old;
}
template <class T>
inline T atomicCAS(T* p, T compare, T val) {
  __atomic_compare_exchange(p, &compare, &val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
