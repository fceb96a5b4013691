// Declarations only; see README.md. ProcessGroupGloo::setTimeout, an inline
// function of the header, calls Context::setTimeout: declared so the header
// compiles; the shim never calls it.
#pragma once
#include <chrono>

namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
