// A peer's address, resolved once: what TCP connects to, what RDMA's
// connection manager resolves, and what a server binds.
#pragma once

#include <sys/socket.h>

#include <cstdint>
#include <string>
#include <vector>

namespace pagewire {

struct Address {
  sockaddr_storage addr{};
  socklen_t addr_len = 0;
};

struct Endpoint {
  sockaddr_storage addr{};  // the first address resolved (what a server binds)
  socklen_t addr_len = 0;
  // Every address resolved, in getaddrinfo's order: "localhost" may be ::1
  // first and 127.0.0.1 after, and a server may listen on only one.
  std::vector<Address> addresses;
  std::string text;  // HOST:PORT, for messages
};

// Resolves host and port; throws Error(kConnectFailed) when it cannot.
Endpoint resolve(const std::string& host, uint16_t port);

}  // namespace pagewire
