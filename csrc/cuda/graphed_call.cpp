// CUDA-graph replay of the general path; the rules are in graphed_call.h.
//
// Recording follows the pattern of torch.cuda.graphs: the call first runs eagerly on a side
// stream (creating whatever cuBLAS state that stream needs, which a capture must not allocate),
// then runs again under capture there, into a private memory pool that the graph keeps for its
// intermediates, and the graph is replayed once for the recording call's own results. Capture mode "thread local":
// other threads' CUDA calls stay legal while this thread records.
#include "graphed_call.h"

#include <ATen/Context.h>
#include <ATen/cuda/CUDAGraph.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>

// Declared in ATen/cuda/CUDAContextLight.h, which needs the cuBLAS headers (not on every build
// machine): frees the cuBLAS workspaces of every (handle, stream), so that the next GEMM on a
// stream allocates its own.
namespace at::cuda {
TORCH_CUDA_CPP_API void clearCublasWorkspaces();
}  // namespace at::cuda

namespace fbfast {
namespace cuda {
namespace {

// FBFAST_CUDA_GRAPHS is read once, when the library loads (a call never reads the environment:
// see path_from_env in rollout_cuda.cpp).
GraphMode mode_from_env() {
  const char* env = std::getenv("FBFAST_CUDA_GRAPHS");
  return env ? parse_graph_mode(env).value_or(GraphMode::kOff) : GraphMode::kOff;
}
std::atomic<int> g_mode{static_cast<int>(mode_from_env())};

std::atomic<int64_t> g_recorded{0}, g_replayed{0}, g_failed{0}, g_held{0};

// Event flags: no timing, so that recording one costs nothing on the GPU.
cudaEvent_t make_event() {
  cudaEvent_t event = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  return event;
}

// The stream every recording of a device is captured on: created here and never destroyed, so
// that no other code enqueues work on it (a capture would take that work in) and no later stream
// reuses its handle.
c10::cuda::CUDAStream capture_stream(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::map<c10::DeviceIndex, cudaStream_t> streams;
  const std::lock_guard<std::mutex> lock(mutex);
  cudaStream_t& stream = streams[device];
  if (!stream) {
    const c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  }
  return c10::cuda::getStreamFromExternal(stream, device);
}

// `waiter` continues only after the work enqueued on `signaller` so far.
void join(const c10::cuda::CUDAStream& waiter, const c10::cuda::CUDAStream& signaller) {
  cudaEvent_t event = make_event();
  C10_CUDA_CHECK(cudaEventRecord(event, signaller.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(waiter.stream(), event, 0));
  C10_CUDA_CHECK(cudaEventDestroy(event));  // released once the wait is satisfied
}

// One key's state: seen before (no graph yet), recorded, or failed to record.
struct Entry {
  std::mutex mutex;  // held from copying the inputs in to copying the results out
  std::vector<at::Tensor> in, out;  // the graph's own tensors
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  cudaEvent_t done = nullptr;  // recorded after each use of the graph's tensors
  bool failed = false;
  // Read by the eviction under the cache's lock while `graph` may be being recorded under this
  // entry's: set once the graph exists.
  std::atomic<bool> has_graph{false};
  std::atomic<int64_t> seen{0};
  uint64_t last_use = 0;  // under the cache's lock

  ~Entry() {
    // The last replay may still run: its pool must not be handed out before it ends. Errors are
    // ignored (at exit the CUDA context may be gone); a destructor must not throw.
    if (done) {
      (void)cudaEventSynchronize(done);
      (void)cudaEventDestroy(done);
    }
    if (graph) --g_held;
    graph.reset();
  }
};

struct Cache {
  std::mutex mutex;
  std::map<std::vector<int64_t>, std::shared_ptr<Entry>> entries;
  uint64_t clock = 0;
};

// Never destroyed: at process exit the CUDA context and the caching allocator may be gone before
// a static's destructor would run, and a graph's pool cannot be released then.
Cache& cache() {
  static Cache* c = new Cache;
  return *c;
}

// Keys seen once, and failed ones, are cheap but not free; beyond this many the oldest go.
constexpr size_t kMaxKeys = 256;

// Entries to drop so that at most kMaxGraphs graphs and kMaxKeys keys remain, least recently used
// first, never `keep`. Called with the cache locked; the caller destroys them after unlocking.
std::vector<std::shared_ptr<Entry>> evict(Cache& c, const Entry* keep) {
  std::vector<std::shared_ptr<Entry>> dropped;
  for (;;) {
    size_t graphs = 0;
    auto oldest_graph = c.entries.end(), oldest = c.entries.end();
    for (auto it = c.entries.begin(); it != c.entries.end(); ++it) {
      if (it->second.get() == keep) continue;
      const bool has_graph = it->second->has_graph.load();
      graphs += has_graph;
      if (has_graph && (oldest_graph == c.entries.end() || it->second->last_use < oldest_graph->second->last_use))
        oldest_graph = it;
      if (oldest == c.entries.end() || it->second->last_use < oldest->second->last_use) oldest = it;
    }
    if (keep && keep->has_graph.load()) ++graphs;
    auto victim = graphs > kMaxGraphs ? oldest_graph : c.entries.size() > kMaxKeys ? oldest : c.entries.end();
    if (victim == c.entries.end()) return dropped;
    dropped.push_back(std::move(victim->second));
    c.entries.erase(victim);
  }
}

void add_tensor_key(std::vector<int64_t>& key, const at::Tensor& t) {
  if (!t.defined()) {
    key.push_back(-1);
    return;
  }
  key.push_back(static_cast<int64_t>(t.scalar_type()));
  key.push_back(t.dim());
  for (const int64_t s : t.sizes()) key.push_back(s);
}

std::vector<at::Tensor> like(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.defined() ? at::empty(t.sizes(), t.options()) : at::Tensor());
  return out;
}

void copy_all(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src) {
  for (size_t i = 0; i < dst.size(); ++i)
    if (dst[i].defined()) dst[i].copy_(src[i]);
}

// First use of a key that may be recorded: run the call eagerly on the capture stream into the
// entry's own tensors, then once more under capture, then replay the graph for this call's
// results. The cuBLAS workspaces are cleared right before the capture, so that the one the
// captured GEMMs use is allocated inside the graph's own pool (the graph owns it), and right
// after, so that no later eager GEMM shares it. Returns false, leaving `out` alone, when the
// eager run fails (e.g. no memory for the graph's copies): the caller then runs step by step. A
// failed capture marks the entry, turns recording off for the process (a capture that failed
// half-way can leave the allocator or a generator in an odd state, which a second one would not
// mend), and the eager run's results stand.
bool record(Entry& entry, const std::vector<at::Tensor>& in, const std::vector<at::Tensor>& out,
            const GraphBody& body, const c10::cuda::CUDAStream& current) {
  const c10::cuda::CUDAStream side = capture_stream(current.device_index());
  try {
    entry.in = like(in);
    entry.out = like(out);
    copy_all(entry.in, in);
    join(side, current);
    const c10::cuda::CUDAStreamGuard on_side(side);
    body(entry.in, entry.out);
  } catch (const std::exception&) {
    join(current, side);  // the tensors are freed on the current stream
    entry.in.clear();
    entry.out.clear();
    entry.failed = true;
    return false;
  }
  {
    const c10::cuda::CUDAStreamGuard on_side(side);
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    try {
      at::cuda::clearCublasWorkspaces();
      graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      try {
        body(entry.in, entry.out);
      } catch (...) {
        try {
          graph->capture_end();
        } catch (...) {
        }
        throw;
      }
      graph->capture_end();
      at::cuda::clearCublasWorkspaces();
      // The call's results come from the graph itself, so that every call through it gives the
      // same bits (cuBLAS may pick other kernels under capture than in the eager run).
      graph->replay();
      entry.graph = std::move(graph);
      entry.has_graph = true;
      ++g_recorded;
      ++g_held;
    } catch (const std::exception& e) {
      (void)cudaGetLastError();  // a refused capture leaves its error behind
      entry.failed = true;
      ++g_failed;
      set_graph_mode(GraphMode::kOff);
      const std::string what = e.what();
      TORCH_WARN("fbfast: the general path could not be recorded as a CUDA graph (",
                 what.substr(0, what.find('\n')), "); cuda_graphs is now 'off' for this process");
    }
  }
  join(current, side);
  copy_all(out, entry.out);
  if (entry.failed) {
    // Freed on the current stream, which has joined every use of them.
    entry.in.clear();
    entry.out.clear();
  }
  return true;
}

}  // namespace

std::optional<GraphMode> parse_graph_mode(const std::string& name) {
  if (name == "auto") return GraphMode::kAuto;
  if (name == "always") return GraphMode::kAlways;
  if (name == "off") return GraphMode::kOff;
  return std::nullopt;
}

const char* graph_mode_name(GraphMode mode) {
  return mode == GraphMode::kAlways ? "always" : mode == GraphMode::kOff ? "off" : "auto";
}

GraphMode graph_mode() { return static_cast<GraphMode>(g_mode.load(std::memory_order_relaxed)); }
void set_graph_mode(GraphMode mode) { g_mode.store(static_cast<int>(mode)); }

void release_graphs() {
  Cache& c = cache();
  std::map<std::vector<int64_t>, std::shared_ptr<Entry>> dropped;
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    dropped.swap(c.entries);
  }
  // Destroyed here, outside the lock, each after its last replay (Entry's destructor).
}

bool run_graphed(std::vector<int64_t> key, int64_t steps, const std::vector<at::Tensor>& in,
                 const std::vector<at::Tensor>& out, const GraphBody& body) {
  const GraphMode mode = graph_mode();
  if (mode == GraphMode::kOff || (mode == GraphMode::kAuto && steps < kGraphMinSteps) || steps > kGraphMaxSteps)
    return false;
  // Someone is capturing this stream: the eager path runs inside their graph.
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return false;
  int64_t bytes = 0;
  for (const auto* list : {&in, &out})
    for (const auto& t : *list) bytes += t.defined() ? static_cast<int64_t>(t.nbytes()) : 0;
  if (bytes > kGraphMaxBytes) return false;

  const c10::DeviceIndex device = c10::cuda::current_device();
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device);
  key.push_back(device);
  key.push_back(static_cast<int64_t>(current.id()));
  // The process's math settings that a recorded GEMM keeps: TF32, reduced-precision reductions.
  const at::Context& ctx = at::globalContext();
  key.push_back(ctx.allowTF32CuBLAS());
  key.push_back(static_cast<int64_t>(ctx.float32MatmulPrecision()));
  key.push_back(static_cast<int64_t>(ctx.allowFP16ReductionCuBLAS()));
  key.push_back(static_cast<int64_t>(ctx.allowBF16ReductionCuBLAS()));
  for (const auto* list : {&in, &out}) {
    key.push_back(static_cast<int64_t>(list->size()));
    for (const auto& t : *list) add_tensor_key(key, t);
  }

  Cache& c = cache();
  std::shared_ptr<Entry> entry;
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    std::shared_ptr<Entry>& slot = c.entries[key];
    if (!slot) slot = std::make_shared<Entry>();
    entry = slot;
    ++entry->seen;
    entry->last_use = ++c.clock;
  }
  std::vector<std::shared_ptr<Entry>> dropped;
  {
    const std::lock_guard<std::mutex> use(entry->mutex);
    bool ran = false;
    if (!entry->failed && (entry->graph || mode == GraphMode::kAlways || entry->seen >= 2)) {
      if (!entry->done) entry->done = make_event();
      if (entry->graph) {
        copy_all(entry->in, in);
        entry->graph->replay();
        copy_all(out, entry->out);
        ++g_replayed;
        ran = true;
      } else {
        ran = record(*entry, in, out, body, current);
      }
      C10_CUDA_CHECK(cudaEventRecord(entry->done, current.stream()));
    }
    if (!ran) {
      const std::lock_guard<std::mutex> lock(c.mutex);
      dropped = evict(c, entry.get());
      return false;
    }
  }
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    dropped = evict(c, entry.get());
  }
  return true;  // `dropped` is destroyed here, outside both locks
}

GraphStats graph_stats() {
  GraphStats s;
  s.recorded = g_recorded.load();
  s.replayed = g_replayed.load();
  s.failed = g_failed.load();
  s.held = g_held.load();
  return s;
}

}  // namespace cuda
}  // namespace fbfast
