#include "transport/transport.h"

#include "runtime/uri.h"
#include "spdlog/spdlog.h"
#include "transport/tcp/tcp_transport.h"

namespace pagewire {

std::string_view to_string(Errc code) {
  switch (code) {
    case Errc::kOk: return "ok";
    case Errc::kBadUri: return "bad URI";
    case Errc::kNotFound: return "no such region";
    case Errc::kConnectFailed: return "connect failed";
    case Errc::kProtocol: return "protocol error";
    case Errc::kOutOfBounds: return "read outside the region";
    case Errc::kIo: return "I/O error";
    case Errc::kTimeout: return "timed out";
    case Errc::kClosed: return "connection closed";
    case Errc::kUffdUnavailable: return "userfaultfd unavailable";
    case Errc::kInvalidArgument: return "invalid argument";
    case Errc::kCancelled: return "cancelled";
  }
  return "unknown error";
}

std::unique_ptr<Transport> connect_transport(std::string_view uri, const TransportOptions& t) {
  RegionUri u = parse_region_uri(uri);
  spdlog::info("transport: {} chosen by URI scheme for {}", u.scheme, uri);
  return std::make_unique<tcp::TcpTransport>(u.host, u.port, u.name, t);
}

}  // namespace pagewire
