// Counts the ATen ops a process dispatches, for tools/bench/count_ops.sh: loaded
// with LD_PRELOAD into `simclr` or into Python with torch, it registers a
// global RecordFunction observer and, at exit, writes one line per op name
// to $OPCOUNT_OUT: the name, how often it ran, and how often it ran as a
// kernel, i.e. not a view or an allocation and with no such op nested
// inside it. On a GPU each kernel op is about one launch.
#include <ATen/record_function.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

namespace {

// Ops that make views or allocate, or only dispatch to other ops.
const std::set<std::string> kNoKernel = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::as_strided",
    "aten::view", "aten::_reshape_alias", "aten::reshape", "aten::_unsafe_view", "aten::slice",
    "aten::select", "aten::narrow", "aten::permute", "aten::transpose", "aten::t", "aten::numpy_T",
    "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::alias", "aten::detach",
    "detach", "aten::resize_", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
    "aten::unbind", "aten::split", "aten::chunk", "aten::flatten", "aten::view_as", "aten::as_strided_",
    "aten::unsqueeze_", "aten::set_", "aten::contiguous", "aten::to", "aten::_to_copy"};

// Views, allocations, and the autograd engine's records around each node.
bool launches_nothing(const std::string& name) {
  return kNoKernel.count(name) > 0 || name.rfind("autograd::", 0) == 0;
}

struct Counts {
  long all = 0;
  long kernels = 0;
};

std::mutex mutex;
// Leaked on purpose: the observer may still run while statics are destroyed.
auto* counts = new std::map<std::string, Counts>();
// Per thread, for each op running: whether a kernel op ran inside it.
thread_local std::vector<bool> running;

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  if (!running.empty() && !launches_nothing(fn.name())) running.back() = true;
  running.push_back(false);
  return nullptr;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
  const bool inner_kernel = !running.empty() && running.back();
  if (!running.empty()) running.pop_back();
  std::lock_guard<std::mutex> lock(mutex);
  Counts& c = (*counts)[fn.name()];
  c.all++;
  if (!inner_kernel && !launches_nothing(fn.name())) c.kernels++;
}

struct Observer {
  Observer() {
    at::addGlobalCallback(
        at::RecordFunctionCallback(on_start, on_end).scopes({at::RecordScope::FUNCTION}).needsInputs(false));
  }
  ~Observer() {
    const char* path = std::getenv("OPCOUNT_OUT");
    FILE* out = path ? std::fopen(path, "w") : stderr;
    if (!out) return;
    std::lock_guard<std::mutex> lock(mutex);
    for (const auto& [name, c] : *counts) std::fprintf(out, "%s\t%ld\t%ld\n", name.c_str(), c.all, c.kernels);
    if (out != stderr) std::fclose(out);
  }
} observer;

}  // namespace
