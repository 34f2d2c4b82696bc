// Thread setup for the fault path: names, CPU placement, priority.
#pragma once

#include <string>

namespace pagewire {

// Names the calling thread (as top and perf show it), pins it to `cpu`
// (-1: the scheduler decides) and sets its nice value (0: unchanged).
void setup_fault_thread(const std::string& name, int cpu, int nice);

}  // namespace pagewire
