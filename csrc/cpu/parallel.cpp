#include "parallel.h"

#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#endif

namespace msgd {
namespace {

// The OpenMP entry points used: GOMP_parallel is the one compilers emit for
// `#pragma omp parallel` (libgomp; LLVM's and Intel's runtimes export it too).
struct OpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;
  int (*thread_num)() = nullptr;
  int (*num_threads)() = nullptr;
  std::string path;
};

#if defined(__linux__)
bool is_openmp_runtime(const char* path) {
  const char* base = std::strrchr(path, '/');
  base = base ? base + 1 : path;
  return std::strncmp(base, "libgomp", 7) == 0 || std::strncmp(base, "libiomp5", 8) == 0 ||
         std::strncmp(base, "libomp.", 7) == 0 || std::strncmp(base, "libomp-", 7) == 0;
}

int find_runtime(struct dl_phdr_info* info, size_t, void* out) {
  if (info->dlpi_name && *info->dlpi_name && is_openmp_runtime(info->dlpi_name)) {
    *static_cast<std::string*>(out) = info->dlpi_name;
    return 1;
  }
  return 0;
}
#endif

const OpenMP& openmp() {
  static const OpenMP found = [] {
    OpenMP r;
#if defined(__linux__)
    const char* choice = std::getenv("MANIFOLD_SGD_CPU_PARALLEL");  // "threads": std::thread only
    if (choice && std::strcmp(choice, "threads") == 0) return r;
    std::string path;
    dl_iterate_phdr(find_runtime, &path);
    if (path.empty()) return r;
    void* h = dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);  // only if already loaded
    if (!h) return r;
    r.parallel = reinterpret_cast<decltype(r.parallel)>(dlsym(h, "GOMP_parallel"));
    r.thread_num = reinterpret_cast<decltype(r.thread_num)>(dlsym(h, "omp_get_thread_num"));
    r.num_threads = reinterpret_cast<decltype(r.num_threads)>(dlsym(h, "omp_get_num_threads"));
    if (!r.parallel || !r.thread_num || !r.num_threads) return OpenMP{};
    r.path = path;
#endif
    return r;
  }();
  return found;
}

struct Job {
  int n;
  const std::function<void(int)>* fn;
  const OpenMP* omp;
};

void run_in_team(void* p) {
  const Job& job = *static_cast<Job*>(p);
  // the team may be smaller than asked (nested regions, thread limits): stride over it
  const int team = job.omp->num_threads(), me = job.omp->thread_num();
  for (int i = me; i < job.n; i += team) (*job.fn)(i);
}

}  // namespace

void parallel_run(int n, const std::function<void(int)>& fn) {
  if (n <= 1) {
    if (n == 1) fn(0);
    return;
  }
  const OpenMP& omp = openmp();
  if (omp.parallel) {
    Job job{n, &fn, &omp};
    omp.parallel(run_in_team, &job, unsigned(n), 0);
    return;
  }
  std::vector<std::thread> pool;
  for (int i = 1; i < n; ++i) pool.emplace_back(fn, i);
  fn(0);
  for (auto& th : pool) th.join();
}

const char* parallel_backend() {
  static const std::string name = openmp().parallel ? "openmp:" + openmp().path : "std::thread";
  return name.c_str();
}

}  // namespace msgd
