// The kernels' threads: the calling thread (MLX's CPU stream) and workers that wait for their
// next job spinning, then yielding, then asleep.
//
// A decode step runs ~100 short jobs. Under GNU OpenMP each cost ~20 us more on two threads than
// on one (2-core AMD VM): its worker slept between jobs and was woken through the kernel for each
// (~3 futex calls a job, against ~1 here), whatever GOMP_SPINCOUNT said. And a team's join waits
// for every thread, also one that the OS has not run yet: with Python building the next step on
// one of two cores, that can be a time slice. Here a worker spins for SPIN, then gives way to any
// thread that can run until WAIT has passed, then sleeps; and a job's caller takes back the share
// of a worker that has not started it once the chunks are done. The 270M decoded 1.41x faster at
// 4-bit than under OpenMP on that VM (docs/kernels.md, "Threads").
#pragma once

#include <omp.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define OE_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define OE_CPU_RELAX() asm volatile("yield")
#else
#define OE_CPU_RELAX() ((void)0)
#endif

namespace oe {

class ThreadPool {
 public:
  static ThreadPool& get() {
    static ThreadPool* pool = new ThreadPool;  // never destroyed: its workers outlive main()
    return *pool;
  }

  // The threads a job may use, the caller's included: OpenMP's setting (OMP_NUM_THREADS), which
  // the BLAS that MLX calls (OpenBLAS's or MKL's GNU OpenMP build) follows too.
  static int threads() { return std::max(1, omp_get_max_threads()); }

  // body(c) for each c in [0, chunks), over up to `threads` threads, the caller one of them, each
  // taking the next chunk when it is free. A job from inside a job, or from a second thread while
  // one runs, runs on its caller alone.
  template <class Body>
  void run(int threads, int64_t chunks, Body&& body) {
    auto alone = [&] {
      for (int64_t c = 0; c < chunks; c++) body(c);
    };
    threads = int(std::min<int64_t>(threads, chunks));
    if (threads <= 1 || in_job_) return alone();  // in_job_ first: the lock may be this thread's
    std::unique_lock lock(mutex_, std::try_to_lock);
    if (!lock.owns_lock()) return alone();
    using B = std::remove_reference_t<Body>;
    Job job{[](void* b, int64_t c) { (*static_cast<B*>(b))(c); }, &body, chunks};
    const int helpers = threads - 1;
    hire(helpers);
    for (int i = 0; i < helpers; i++) slots_[i]->post(&job);
    // The workers hold `job` until they finish, also when a chunk of the caller's throws (a failed
    // allocation): they must be done with it before it goes.
    struct Finish {
      ThreadPool& pool;
      Job& job;
      int helpers;
      ~Finish() {
        for (int i = 0; i < helpers; i++) pool.slots_[i]->finish(&job);
      }
    } finish{*this, job, helpers};
    work(job);
  }

 private:
  struct Job {
    void (*call)(void*, int64_t);
    void* body;
    int64_t chunks;
    std::atomic<int64_t> next{0};
  };

  static constexpr auto SPIN = std::chrono::microseconds(10), WAIT = std::chrono::microseconds(200);

  // A worker's mailbox, on a cache line of its own: null, a posted job, or claimed().
  struct alignas(64) Slot {
    std::atomic<Job*> job{nullptr};
    std::atomic<uint32_t> bell{0};
    std::atomic<bool> asleep{false};

    static Job* claimed() { return reinterpret_cast<Job*>(alignof(Job)); }

    void post(Job* j) {
      job.store(j);
      if (asleep.load()) {
        bell.fetch_add(1);
        bell.notify_one();
      }
    }
    // Takes back the job if the worker has not claimed it, else waits until it is done.
    void finish(Job* j) {
      if (job.compare_exchange_strong(j, nullptr)) return;
      while (job.load(std::memory_order_acquire) != nullptr) OE_CPU_RELAX();
    }
    Job* take() {
      auto start = std::chrono::steady_clock::now();
      for (int i = 1;; i++) {
        Job* j = job.load(std::memory_order_acquire);
        if (j != nullptr && j != claimed() && job.compare_exchange_strong(j, claimed())) return j;
        if (i % 32) {
          OE_CPU_RELAX();
          continue;
        }
        const auto waited = std::chrono::steady_clock::now() - start;
        if (waited < SPIN) continue;
        if (waited < WAIT) {
          sched_yield();
          continue;
        }
        const uint32_t b = bell.load();
        asleep.store(true);
        if (job.load() == nullptr) bell.wait(b);
        asleep.store(false);
        start = std::chrono::steady_clock::now();
      }
    }
  };

  static void work(Job& job) {
    struct InJob {
      InJob() { in_job_ = true; }
      ~InJob() { in_job_ = false; }
    } in_job;
    for (int64_t c; (c = job.next.fetch_add(1, std::memory_order_relaxed)) < job.chunks;)
      job.call(job.body, c);
  }

  // At least n workers, started on first need.
  void hire(int n) {
    while (int(slots_.size()) < n) {
      Slot* slot = new Slot;
      slots_.push_back(slot);
      std::thread([slot] {
        for (;;) {
          work(*slot->take());
          slot->job.store(nullptr, std::memory_order_release);
        }
      }).detach();
    }
  }

  std::mutex mutex_;
  std::vector<Slot*> slots_;
  static inline thread_local bool in_job_ = false;
};

}  // namespace oe
