#include "runtime/threads.h"

#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>

#include "pagewire/region.h"
#include "spdlog/spdlog.h"

namespace pagewire {
namespace {

void pin_to(int cpu) {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  ::pthread_setaffinity_np(::pthread_self(), sizeof set, &set);
}

// Demand faults first, on the CPU too: a handler woken by a fault's reply
// should preempt the puller and the application. Raising priority needs
// CAP_SYS_NICE; without it the thread stays at its default, and says so.
void set_nice(int nice) {
  if (nice == 0) return;
  if (::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), nice) != 0) {
    static std::once_flag once;
    std::call_once(once, [nice] { spdlog::info("fault threads: cannot set nice {} (needs CAP_SYS_NICE)", nice); });
  }
}

}  // namespace

void setup_fault_thread(const std::string& name, int cpu, int nice) {
  ::pthread_setname_np(::pthread_self(), name.substr(0, 15).c_str());
  pin_to(cpu);
  set_nice(nice);
}

unsigned default_handler_threads() {
  const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  return static_cast<unsigned>(std::clamp<long>(cpus, 1, 4));
}

}  // namespace pagewire
