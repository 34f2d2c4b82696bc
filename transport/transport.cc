#include "transport/transport.h"

#include "spdlog/spdlog.h"
#if PAGEWIRE_HAVE_RDMA
#include "transport/rdma/rdma_transport.h"
#endif
#include "transport/tcp/tcp_transport.h"
#include "transport/uri.h"

namespace pagewire {

std::unique_ptr<Transport> connect_transport(std::string_view uri, const TransportOptions& t) {
  RegionUri u = parse_region_uri(uri);
#if !PAGEWIRE_HAVE_RDMA
  if (u.scheme == "rdma") {
    throw Error(Errc::kInvalidArgument,
                std::string(uri) + ": this pagewire is built without RDMA; use tcp:// or auto://");
  }
  if (u.scheme == "auto") {
    spdlog::info("transport: tcp for {} (auto: this pagewire is built without RDMA)", uri);
  } else {
    spdlog::info("transport: tcp, chosen by URI scheme for {}", uri);
  }
#else
  if (u.scheme == "rdma") {
    spdlog::info("transport: rdma, chosen by URI scheme for {}", uri);
    return std::make_unique<rdma::RdmaTransport>(u.host, u.port, u.name, t);
  }
  if (u.scheme == "auto") {
    if (!rdma::have_device()) {
      spdlog::info("transport: tcp for {} (auto: no RDMA device here)", uri);
    } else {
      try {
        auto transport = std::make_unique<rdma::RdmaTransport>(u.host, u.port, u.name, t);
        spdlog::info("transport: rdma for {} (auto: a device exists and the peer speaks RDMA)", uri);
        return transport;
      } catch (const std::exception& e) {
        // A peer without RDMA, a device that cannot take one more queue
        // pair or registration (setup errors come as std::system_error
        // too), or a region the source could export over TCP only: TCP
        // then answers, or says what is wrong in its own words.
        spdlog::info("transport: tcp for {} (auto: RDMA failed: {})", uri, e.what());
      }
    }
  } else {
    spdlog::info("transport: tcp, chosen by URI scheme for {}", uri);
  }
#endif
  return std::make_unique<tcp::TcpTransport>(u.host, u.port, u.name, t);
}

}  // namespace pagewire
