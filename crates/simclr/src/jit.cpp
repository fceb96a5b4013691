// A C ABI over one pass on a TorchScript module that tch does not bind:
// turning the tensors a trace holds as constants into the module's buffers.
// Compiled by build.rs with the c10d shim; see src/export.rs for the Rust
// side.
//
// libtorch's tracer (tch's CModule::create_by_tracing) records every tensor
// it did not get as an input, the network's weights among them, as a
// constant of the graph. A module whose weights are constants runs, and
// `torch.jit.load(..., map_location=...)` puts them on a device, but
// `module.to(device)`, `.cuda()`, `.half()` and `state_dict()` do not see
// them: the first call after `.cuda()` fails on tensors of two devices.
// `torch.jit.trace` of a Python nn.Module avoids this by reading weights as
// attributes of `self`; this pass makes a traced graph do the same.
//
// Every exported function catches every C++ exception and returns non-zero
// (guarded.h); the message is kept per thread for simclr_jit_last_error().
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/serialization/import.h>

#include "guarded.h"

using simclr::guarded;
using simclr::last_error;

extern "C" {

const char* simclr_jit_last_error() { return last_error.c_str(); }

// Reads the module at `input`, makes every tensor constant of its `method`
// a buffer named `prefix` + its index (in the order the graph lists its
// nodes, which is not the network's), read from
// `self`, and saves the module to `output`. `lifted` gets the number of
// buffers made. The graph must be flat (a trace's is): constants inside
// blocks are refused.
int simclr_jit_lift_constants(const char* input, const char* output, const char* method, const char* prefix,
                              int64_t* lifted) {
  return guarded([&] {
    torch::jit::Module module = torch::jit::load(std::string(input));
    std::shared_ptr<torch::jit::Graph> graph = module.get_method(method).graph();
    if (graph->inputs().empty() || !graph->inputs()[0]->type()->cast<c10::ClassType>()) {
      throw std::invalid_argument(std::string("the method '") + method + "' does not take the module as self");
    }
    torch::jit::Value* self = graph->inputs()[0];
    std::vector<torch::jit::Node*> constants;
    for (torch::jit::Node* node : graph->nodes()) {
      for (torch::jit::Block* block : node->blocks()) {
        for (torch::jit::Node* inner : block->nodes()) {
          if (inner->kind() == c10::prim::Constant && inner->output()->type()->cast<c10::TensorType>()) {
            throw std::invalid_argument("a tensor constant inside a block (control flow): not a trace's graph");
          }
        }
      }
      if (node->kind() == c10::prim::Constant && node->output()->type()->cast<c10::TensorType>()) {
        constants.push_back(node);
      }
    }
    int64_t index = 0;
    for (torch::jit::Node* node : constants) {
      const std::string name = std::string(prefix) + std::to_string(index++);
      if (module.type()->hasAttribute(name)) {
        throw std::invalid_argument("the module already has an attribute '" + name + "'");
      }
      module.register_buffer(name, node->t(c10::attr::value));
      torch::jit::WithInsertPoint point(node);
      node->output()->replaceAllUsesWith(graph->insertGetAttr(self, name));
      node->destroy();
    }
    module.save(std::string(output));
    *lifted = index;
  });
}

}  // extern "C"
