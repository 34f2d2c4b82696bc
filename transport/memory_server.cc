#include "pagewire/server.h"

#include "common/auth.h"
#include "pagewire/error.h"
#include "spdlog/spdlog.h"
#include "transport/export_table.h"
#include "transport/tickets.h"
#if PAGEWIRE_HAVE_RDMA
#include "transport/rdma/rdma_server.h"
#endif
#include "transport/tcp/tcp_server.h"

namespace pagewire {
#if !PAGEWIRE_HAVE_RDMA
namespace rdma {
// A build without rdma-core: no device, and an RDMA server that refuses to
// be made, so that MemoryServer's pointer to one stays null (and RdmaServing
// kAuto serves TCP only, kOn fails with the reason).
namespace {
bool have_device() { return false; }
}  // namespace
class RdmaServer {
 public:
  template <typename... Args>
  explicit RdmaServer(Args&&...) {
    throw Error(Errc::kInvalidArgument, "RDMA serving was asked for (RdmaServing::kOn, serve --rdma on), but this "
                                        "pagewire is built without RDMA");
  }
  void add(const ExportedRegion&) {}
  void remove(const std::string&) {}
  uint64_t connections_accepted() const { return 0; }
  uint64_t connections_active() const { return 0; }
  uint64_t writes_applied() const { return 0; }
  void drop_connections() {}
  void stop() {}
};
}  // namespace rdma
#endif

MemoryServer::MemoryServer(const ServerOptions& options)
    : key_(AuthKey::from_option(options.key_file)),
      tickets_(std::make_unique<TicketBook>()),
      exports_(std::make_unique<ExportTable>()),
      tcp_(std::make_unique<TcpServer>(options, *exports_, key_, *tickets_)),
      rdma_mode_(options.rdma) {
  if (options.rdma == RdmaServing::kOff) return;
  if (options.rdma == RdmaServing::kAuto && !rdma::have_device()) {
    spdlog::info("server: no RDMA device; serving TCP only");
    return;
  }
  try {
    // With a key, an RDMA peer must bring a ticket it got over TCP by
    // proving the key (transport/tickets.h); a writer always does.
    rdma_ = std::make_unique<rdma::RdmaServer>(options.bind_address, tcp_->port(), options.max_connections, *tickets_,
                                               key_ != nullptr);
  } catch (const std::exception& e) {
    if (options.rdma == RdmaServing::kOn) throw;
    spdlog::warn("server: not serving RDMA: {}", e.what());
  }
}

MemoryServer::~MemoryServer() { stop(); }

bool MemoryServer::serves_rdma() const { return rdma_ != nullptr; }

void MemoryServer::export_file(const std::string& name, const std::string& path, uint32_t page_size) {
  add(ExportTable::from_file(name, path, page_size));
}

void MemoryServer::export_memory(const std::string& name, const void* base, size_t length, uint32_t page_size,
                                 uint64_t identity) {
  ExportOptions options;
  options.page_size = page_size;
  options.identity = identity;
  add(ExportTable::from_memory(name, base, length, options));
}

void MemoryServer::export_memory(const std::string& name, void* base, size_t length, const ExportOptions& options) {
  add(ExportTable::from_memory(name, base, length, options), options.track_writes ? &options : nullptr);
}

void MemoryServer::export_node(const std::string& name, size_t length, uint32_t page_size) {
  add(ExportTable::node(name, length, page_size));
}

void MemoryServer::add(std::unique_ptr<ExportedRegion> region, const ExportOptions* live) {
  const ExportedRegion& r = exports_->add(std::move(region), live == nullptr);
  if (rdma_) {
    try {
      rdma_->add(r);
    } catch (const std::exception& e) {
      // Registering it with the device failed (a memlock limit, say).
      if (rdma_mode_ == RdmaServing::kOn) {
        exports_->withdraw(r.name);
        throw;
      }
      spdlog::warn("server: '{}' is served over TCP only: {}", r.name, e.what());
    }
  }
  if (live != nullptr) {
    try {
      exports_->make_live(r, *live);
      exports_->publish(r);
    } catch (...) {
      // No write tracking here (or a range it refuses): not exported at all.
      if (rdma_) rdma_->remove(r.name);
      throw;
    }
  }
}

void MemoryServer::mark_changed(const std::string& name, uint64_t offset, uint64_t length) {
  exports_->mark_changed(name, offset, length);
}

uint16_t MemoryServer::port() const { return tcp_->port(); }
bool MemoryServer::keyed() const { return key_ != nullptr; }
ServerStats MemoryServer::stats() const {
  ServerStats s = tcp_->stats();
  if (rdma_) {
    s.rdma_connections_accepted = rdma_->connections_accepted();
    s.rdma_connections_active = rdma_->connections_active();
    s.writes_applied += rdma_->writes_applied();
  }
  return s;
}

void MemoryServer::drop_connections() {
  tcp_->drop_connections();
  if (rdma_) rdma_->drop_connections();
}

void MemoryServer::stop() {
  if (rdma_) rdma_->stop();
  tcp_->stop();
}

}  // namespace pagewire
