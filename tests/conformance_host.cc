// The conformance suite over the wires every host has: in process, and
// loopback TCP both through io_uring and through plain syscalls. Scenarios
// of a network (dropped connections, a source that dies or comes back) are
// not instantiated for the in-process wire, which has none.
#include "tests/conformance.h"

namespace pagewire::testing {
namespace {

INSTANTIATE_TEST_SUITE_P(Conformance, Scenario,
                         ::testing::ValuesIn(combos({Wire::kLocal, Wire::kTcpUring, Wire::kTcpSyscalls})), combo_name);
INSTANTIATE_TEST_SUITE_P(Conformance, NetworkScenario,
                         ::testing::ValuesIn(combos({Wire::kTcpUring, Wire::kTcpSyscalls})), combo_name);
// The same with one userfaultfd per handler, each region split in parts,
// and handlers that poll before they sleep.
INSTANTIATE_TEST_SUITE_P(PerHandler, Scenario, ::testing::ValuesIn(combos({Wire::kTcpUring}, {false}, nullptr, true)),
                         combo_name);
INSTANTIATE_TEST_SUITE_P(PerHandler, NetworkScenario,
                         ::testing::ValuesIn(combos({Wire::kTcpUring}, {false}, nullptr, true)), combo_name);

}  // namespace
}  // namespace pagewire::testing
