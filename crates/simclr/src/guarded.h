// What the C shims (dist/c10d.cpp, jit.cpp) do with a C++ exception: no
// exception crosses the C ABI; every exported function runs its body
// through guarded(), which returns non-zero on one and keeps its message
// per thread for the shim's *_last_error().
#pragma once

#include <exception>
#include <string>

#include <c10/util/Exception.h>

namespace simclr {

inline thread_local std::string last_error;

template <class F>
int guarded(F&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    // Without the C++ stack, which names no file or value a user can act on.
    last_error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return 1;
}

}  // namespace simclr
