// CUDA-graph replay of the general path (csrc/gemm_path.h) on CUDA.
//
// The general path launches several kernels per step from a host loop: at small batches the GPU
// then waits on the host (~25 us per step), and a T = 1000 rollout costs tens of milliseconds of
// launches for microseconds of arithmetic. A call of the same sizes a second time (the usual case:
// every training step, every planning rollout) is instead recorded once as a CUDA graph on a side
// stream and from then on replayed as one launch, with the call's inputs copied into the graph's
// own input tensors before the replay and its results copied out after it. Every call through a
// graph (the recording call too) gets the graph's results, so they repeat bit for bit; against a
// step-by-step run they agree to cuBLAS's rounding (it may choose other kernels under capture,
// and promises the same bits only per stream).
//
// Setting (cuda_graphs, fbfast.set_kernel_options; FBFAST_CUDA_GRAPHS read at load):
//   "off"    (default) never;
//   "auto"   record a call of at least kGraphMinSteps steps the second time its key (sizes,
//            dtype, device, stream, structure, activation, output mask, the process's TF32 and
//            reduced-precision settings) is seen;
//   "always" record at the first call, whatever its length (what the tests pin).
// Off by default until a GPU run has checked it beside torch.compile's CUDA graphs ("reduce-
// overhead" mode), whose warm-up sends a thread's allocations into their own pool: a recording
// made then would keep memory that they hand out again. Never recorded: a call made while its
// stream is being captured by someone else (a user's torch.cuda.graph, or torch.compile's
// capture: the eager path then runs inside their graph), a call whose own inputs and results
// exceed kGraphMaxBytes (its copies would cost more than the launches saved, and its recorded
// buffers would stay reserved), and one of more than kGraphMaxSteps steps. At most kMaxGraphs
// graphs stay recorded per process, the least recently used going first; setting "off" drops
// them all. A key whose eager run failed (e.g.
// out of memory for the copies) is never tried again; a capture that fails turns recording off
// for the process, with a warning. Recordings are captured on a stream of their own, with the
// cuBLAS workspaces cleared before and after, so that each graph owns the workspace its GEMMs
// use. The first call of a key that is recorded runs twice (eagerly, then under capture) and
// replays once.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace fbfast {
namespace cuda {

enum class GraphMode : int { kAuto = 0, kAlways = 1, kOff = 2 };

constexpr int64_t kGraphMinSteps = 4;
// A graph has several nodes per layer and step; beyond this many steps its recording and
// instantiation would cost seconds, and one launch per step matters little next to them.
constexpr int64_t kGraphMaxSteps = 10000;
constexpr int64_t kGraphMaxBytes = int64_t(256) << 20;
constexpr size_t kMaxGraphs = 8;

std::optional<GraphMode> parse_graph_mode(const std::string& name);
const char* graph_mode_name(GraphMode mode);
GraphMode graph_mode();
void set_graph_mode(GraphMode mode);
// Drops every recorded graph (each after its last replay), returning its memory to the caching
// allocator: what setting cuda_graphs to "off" does.
void release_graphs();

// Computes `out` from `in`: stream-ordered work on the current CUDA stream only (no host
// synchronisation, no host-side decision on tensor values), writing every element of every
// defined `out` tensor. Undefined tensors stay undefined in both lists.
using GraphBody = std::function<void(const std::vector<at::Tensor>& in, const std::vector<at::Tensor>& out)>;

// Runs body(in, out) through a recorded graph when the setting and the rules above allow, and
// returns true; returns false, having done nothing, when the caller should run body itself.
// `key` names everything besides the tensors' sizes and dtypes that changes the recorded work
// (the call's sizes and dtypes are added here, with the device and the current stream). `in`
// and `out` are on the current device; `out` holds the caller's result tensors, contiguous.
bool run_graphed(std::vector<int64_t> key, int64_t steps, const std::vector<at::Tensor>& in,
                 const std::vector<at::Tensor>& out, const GraphBody& body);

// Counters since the process started: graphs recorded, replays, recordings that failed, and the
// graphs held now.
struct GraphStats {
  int64_t recorded = 0, replayed = 0, failed = 0, held = 0;
};
GraphStats graph_stats();

}  // namespace cuda
}  // namespace fbfast
