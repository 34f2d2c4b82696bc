// The conformance suite over RDMA: every scenario, in every backing. Needs
// an RDMA device (Soft-RoCE under tools/rxe-vm in CI) and the address of an
// interface it is bound to in PAGEWIRE_RDMA_ADDR; skips with the reason
// otherwise, and fails instead when PAGEWIRE_REQUIRE_RDMA=1.
#include <cstdlib>
#include <string>

#include "tests/conformance.h"
#include "transport/rdma/verbs.h"

namespace pagewire::testing {

std::string rdma_unavailable() {
  const char* addr = std::getenv("PAGEWIRE_RDMA_ADDR");
  if (!rdma::have_device()) return "no RDMA device here (ibv_devices lists none); run under tools/rxe-vm";
  if (addr == nullptr || *addr == '\0') {
    return "PAGEWIRE_RDMA_ADDR (an address the RDMA device is bound to) is not set";
  }
  return "";
}

namespace {

INSTANTIATE_TEST_SUITE_P(Conformance, Scenario, ::testing::ValuesIn(combos({Wire::kRdma}, {false}, rdma_unavailable)),
                         combo_name);
INSTANTIATE_TEST_SUITE_P(Conformance, NetworkScenario,
                         ::testing::ValuesIn(combos({Wire::kRdma}, {false}, rdma_unavailable)), combo_name);
INSTANTIATE_TEST_SUITE_P(PerHandler, Scenario,
                         ::testing::ValuesIn(combos({Wire::kRdma}, {false}, rdma_unavailable, true)), combo_name);

}  // namespace
}  // namespace pagewire::testing
