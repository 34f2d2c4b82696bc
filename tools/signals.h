#pragma once

#include <functional>

namespace pagewire::cli {

// Runs fn on this thread; returns the signal (SIGBUS, SIGSEGV) that cut it
// short, or 0 when it ran to the end. A page pagewire could not fetch is
// refused with one of these in the thread that touches it; this turns that
// into a value the thread can report. fn must hold nothing that needs a
// destructor to run at the point where it touches the region.
int run_catching_signals(const std::function<void()>& fn);

}  // namespace pagewire::cli
