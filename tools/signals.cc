#include "tools/signals.h"

#include <setjmp.h>
#include <signal.h>

#include <mutex>

namespace pagewire::cli {
namespace {

thread_local sigjmp_buf* t_jump = nullptr;
thread_local volatile sig_atomic_t t_signal = 0;

void on_fault_signal(int sig) {
  if (t_jump != nullptr) {
    t_signal = sig;
    siglongjmp(*t_jump, 1);
  }
  // Not a thread that asked: the usual death, with its core dump.
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

void install_handlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_handler = on_fault_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_NODEFER;
    ::sigaction(SIGBUS, &sa, nullptr);
    ::sigaction(SIGSEGV, &sa, nullptr);
  });
}

}  // namespace

int run_catching_signals(const std::function<void()>& fn) {
  install_handlers();
  sigjmp_buf env;
  t_signal = 0;
  if (sigsetjmp(env, 1) == 0) {
    t_jump = &env;
    fn();
  }
  t_jump = nullptr;
  return t_signal;
}

}  // namespace pagewire::cli
