// SourceControl over a TCP control connection (wire::kHelloControl). RDMA
// destinations use it too: their source serves TCP on the same port, and
// the page bytes still move by RDMA READ.
#pragma once

#include <memory>
#include <string>

#include "common/auth.h"
#include "common/unique_fd.h"
#include "transport/endpoint.h"
#include "transport/protocol.h"
#include "transport/transport.h"

namespace pagewire::tcp {

class TcpControl final : public SourceControl {
 public:
  // Connects and checks that the region there is the one attached (its
  // identity); throws Error.
  TcpControl(Endpoint endpoint, const RegionDescriptor& region, unsigned timeout_ms,
             std::shared_ptr<const AuthKey> key);

  Written written_since(uint64_t since) override;
  uint64_t pause() override;
  void resume() override;

 private:
  void connect();
  // One request and its reply; the bitmap lands in *pages when given.
  uint64_t ask(wire::ControlOp op, uint64_t epoch, ZeroMap* pages);
  uint64_t ask_once(wire::ControlOp op, uint64_t epoch, ZeroMap* pages);

  Endpoint endpoint_;
  std::string name_;
  uint64_t identity_ = 0;
  uint64_t length_ = 0;
  uint32_t page_size_ = 0;
  unsigned timeout_ms_ = 0;
  std::shared_ptr<const AuthKey> key_;
  UniqueFd fd_;
};

}  // namespace pagewire::tcp
