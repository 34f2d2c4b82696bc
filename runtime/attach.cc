#include "pagewire/region.h"
#include "runtime/fault_engine.h"
#include "runtime/precopy.h"
#include "transport/protocol.h"
#include "transport/transport.h"

namespace pagewire {

Region::Region(std::unique_ptr<FaultEngine> engine) : engine_(std::move(engine)) {}
Region::Region(Region&&) noexcept = default;
Region& Region::operator=(Region&&) noexcept = default;
Region::~Region() = default;

std::byte* Region::data() const { return engine_->data(); }
size_t Region::size() const { return engine_->size(); }
uint32_t Region::page_size() const { return engine_->page_size(); }
const std::string& Region::name() const { return engine_->name(); }
std::string_view Region::transport() const { return engine_->transport_name(); }
Stats Region::stats() const { return engine_->stats(); }
Progress Region::progress() const { return engine_->progress(); }
bool Region::wait_complete(std::chrono::milliseconds timeout) const { return engine_->wait_complete(timeout); }
bool Region::failed() const { return engine_->failed(); }
std::string Region::error() const { return engine_->error(); }
const MigrationReport& Region::migration() const { return engine_->migration(); }
FlushReport Region::flush() { return engine_->flush(); }

Region attach(std::unique_ptr<Transport> transport, const AttachOptions& options) {
  if (!options.precopy.enabled) return Region(std::make_unique<FaultEngine>(std::move(transport), options));
  if (!options.background_pull) {
    throw Error(Errc::kInvalidArgument, "precopy moves pages with the background pull: it cannot be off");
  }
  // The first epoch closes before any page is fetched: every write after
  // it is reported by a later harvest.
  std::unique_ptr<SourceControl> control = transport->open_control();
  // Epoch 0 is the export: pages written since may be zero in the map the
  // connection brought (a write after the server's last harvest), so none
  // of them is taken for a zero page.
  const SourceControl::Written first = control->written_since(0);
  auto engine = std::make_unique<FaultEngine>(std::move(transport), options, &first.pages);
  run_precopy(*engine, *control, first.epoch, options.precopy);
  return Region(std::move(engine));
}

Region attach(std::string_view uri, const AttachOptions& options) {
  TransportOptions t{options.request_timeout_ms, options.reconnect_timeout_ms, options.io_uring};
  t.key = AuthKey::from_option(options.key_file);
  // A bounded cache writes back: it holds the node's writer lease.
  t.writer = options.cache_bytes > 0;
  return attach(connect_transport(uri, t), options);
}

}  // namespace pagewire
