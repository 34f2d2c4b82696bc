#include "transport/tcp/tcp_control.h"

#include <string>

#include "spdlog/spdlog.h"
#include "transport/protocol.h"
#include "transport/tcp/socket_util.h"

namespace pagewire::tcp {
namespace {
// A pause waits for the owner's writers, a harvest walks the whole region:
// both may take longer than a read.
constexpr unsigned kControlTimeoutMs = 60000;
// No honest bitmap is larger: one bit per 4 KiB page of a 1 PiB region.
constexpr uint64_t kMaxPayload = uint64_t{1} << 35;
constexpr uint64_t kMaxErrorText = 64 * 1024;

struct Broken {};  // the connection failed: reconnect and ask again
}  // namespace

TcpControl::TcpControl(Endpoint endpoint, const RegionDescriptor& region, unsigned timeout_ms,
                       std::shared_ptr<const AuthKey> key)
    : endpoint_(std::move(endpoint)),
      name_(region.name),
      identity_(region.identity),
      length_(region.length),
      page_size_(region.page_size),
      timeout_ms_(timeout_ms),
      key_(std::move(key)) {
  connect();
}

void TcpControl::connect() {
  fd_.reset();
  std::string why;
  UniqueFd fd = connect_to(endpoint_, timeout_ms_, &why);
  if (!fd) throw Error(Errc::kConnectFailed, "control connection: " + why);
  const RegionDescriptor d = handshake(fd.get(), name_, timeout_ms_, endpoint_.text, wire::kHelloControl, 0,
                                       key_.get());
  if (d.identity != identity_ || d.length != length_ || d.page_size != page_size_) {
    throw Error(Errc::kProtocol, "region '" + name_ + "' on " + endpoint_.text + " is not the one attached");
  }
  set_io_timeout(fd.get(), kControlTimeoutMs);
  fd_ = std::move(fd);
}

uint64_t TcpControl::ask_once(wire::ControlOp op, uint64_t epoch, ZeroMap* pages) {
  if (!fd_) connect();
  const wire::ControlRequest req{wire::kControlMagic, static_cast<uint32_t>(op), epoch};
  wire::ControlReply reply{};
  if (!send_all(fd_.get(), &req, sizeof req) || !recv_all(fd_.get(), &reply, sizeof reply)) throw Broken{};
  if (reply.magic != wire::kControlMagic || reply.payload_bytes > kMaxPayload) {
    fd_.reset();
    throw Error(Errc::kProtocol, "control reply from " + endpoint_.text + " is malformed");
  }
  const auto status = static_cast<Errc>(reply.status);
  if (status != Errc::kOk) {
    if (reply.payload_bytes > kMaxErrorText) {
      fd_.reset();
      throw Error(Errc::kProtocol, "control reply from " + endpoint_.text + " carries an error text too long");
    }
    std::string text(reply.payload_bytes, '\0');
    if (!recv_all(fd_.get(), text.data(), text.size())) throw Broken{};
    throw Error(status, text.empty() ? std::string(to_string(status)) : text);
  }
  const uint64_t pages_total = (length_ + page_size_ - 1) / page_size_;
  const uint64_t expected = pages == nullptr ? 0 : (pages_total + 63) / 64 * 8;
  if (reply.payload_bytes != expected) {
    fd_.reset();
    throw Error(Errc::kProtocol, "control reply from " + endpoint_.text + " has a bitmap of the wrong size");
  }
  if (pages != nullptr) {
    pages->assign(reply.payload_bytes / 8, 0);
    if (!recv_all(fd_.get(), pages->data(), reply.payload_bytes)) throw Broken{};
  }
  return reply.epoch;
}

uint64_t TcpControl::ask(wire::ControlOp op, uint64_t epoch, ZeroMap* pages) {
  try {
    return ask_once(op, epoch, pages);
  } catch (const Broken&) {
    // Both questions may be asked again: a harvest answers "since" the
    // same epoch with a superset, a pause is done once.
    spdlog::warn("control connection to {} dropped; reconnecting", endpoint_.text);
  }
  try {
    connect();
    return ask_once(op, epoch, pages);
  } catch (const Broken&) {
    fd_.reset();
    throw Error(Errc::kClosed, "control connection to " + endpoint_.text + " dropped again");
  }
}

SourceControl::Written TcpControl::written_since(uint64_t since) {
  Written w;
  w.epoch = ask(wire::ControlOp::kWrittenSince, since, since == wire::kNoEpoch ? nullptr : &w.pages);
  for (uint64_t word : w.pages) w.count += static_cast<uint64_t>(__builtin_popcountll(word));
  return w;
}

uint64_t TcpControl::pause() { return ask(wire::ControlOp::kPause, 0, nullptr); }

void TcpControl::resume() { ask(wire::ControlOp::kResume, 0, nullptr); }

}  // namespace pagewire::tcp
