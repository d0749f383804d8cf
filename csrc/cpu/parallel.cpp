// See parallel.h. The helper threads live for the whole process in a pool that is never
// destroyed (threads blocked on a condition variable must not outlive its destructor at exit);
// after fork() the child starts a new pool, because the parent's threads do not exist there.
#include "parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace fbfast::cpu {
namespace {

struct Job {
  Job(int64_t n, const std::function<void(int64_t)>* fn) : n(n), fn(fn) {}
  const int64_t n;
  // Valid while a claimed task is unfinished: the caller does not return before then, and a
  // helper that claims nothing never touches it.
  const std::function<void(int64_t)>* fn;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;
  std::exception_ptr error;

  void work() {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;
      try {
        (*fn)(i);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(mutex);
        if (!error) error = std::current_exception();
      }
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
        const std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

class Pool {
 public:
  void post(const std::shared_ptr<Job>& job, int helpers) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(workers_) < helpers) {
        try {
          std::thread([this] { loop(); }).detach();
        } catch (const std::system_error&) {
          break;  // no thread to be had (a memory limit, a thread limit): fewer helpers
        }
        ++workers_;
      }
      helpers = std::min(helpers, static_cast<int>(workers_));
      for (int i = 0; i < helpers; ++i) queue_.push_back(job);
    }
    for (int i = 0; i < helpers; ++i) ready_.notify_one();
  }

  // Entries of a finished job that no helper picked up.
  void withdraw(const std::shared_ptr<Job>& job) {
    const std::lock_guard<std::mutex> lock(mutex_);
    queue_.erase(std::remove(queue_.begin(), queue_.end(), job), queue_.end());
  }

 private:
  void loop() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return !queue_.empty(); });
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      job->work();
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::shared_ptr<Job>> queue_;
  size_t workers_ = 0;
};

std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork_once;

Pool& pool() {
  std::call_once(g_atfork_once, [] {
    // The parent's pool (its threads, and perhaps a locked mutex) is unusable in the child.
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); });
  });
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (!p) {
    auto* fresh = new Pool();
    if (g_pool.compare_exchange_strong(p, fresh))
      p = fresh;
    else
      delete fresh;
  }
  return *p;
}

}  // namespace

void run_tasks(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  const int helpers = static_cast<int>(std::min<int64_t>(n, std::max(threads, 1)) - 1);
  if (helpers == 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto job = std::make_shared<Job>(n, &fn);
  Pool& p = pool();
  p.post(job, helpers);
  job->work();
  p.withdraw(job);
  {
    std::unique_lock<std::mutex> lock(job->mutex);
    job->finished.wait(lock, [&] { return job->done.load(std::memory_order_acquire) == n; });
  }
  if (job->error) std::rethrow_exception(job->error);
}

}  // namespace fbfast::cpu
