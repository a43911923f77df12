#pragma once

#include <functional>

namespace msgd {

// Runs fn(i) for every i in [0, n), on up to n threads; returns when all are done.
//
// Where the process already has an OpenMP runtime loaded (PyTorch's CPU build brings
// libgomp), its team runs them. Its threads are warm: after each of PyTorch's parallel
// operations they spin for a few milliseconds before sleeping, so threads of our own
// started right after backward() would find the cores taken and lose that time. Without
// such a runtime, std::thread. The native core still links no PyTorch library: the
// runtime is found among the loaded objects, never loaded by us.
// MANIFOLD_SGD_CPU_PARALLEL=threads (read once) forces std::thread.
void parallel_run(int n, const std::function<void(int)>& fn);

// "openmp:<library path>" when parallel_run uses a loaded OpenMP runtime, else "std::thread".
const char* parallel_backend();

}  // namespace msgd
