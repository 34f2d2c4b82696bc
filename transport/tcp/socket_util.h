// Blocking socket helpers for the setup path (connect, handshake); the data
// path never uses them.
#pragma once

#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "pagewire/error.h"
#include "runtime/unique_fd.h"
#include "transport/protocol.h"
#include "transport/transport.h"

namespace pagewire::tcp {

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

// Connects to the first of the endpoint's addresses that answers, each
// within timeout_ms, and sets TCP_NODELAY. On failure returns an empty fd
// and fills *why.
UniqueFd connect_to(const Endpoint& ep, unsigned timeout_ms, std::string* why);

// A server's side of a connection: a peer whose host dies or drops off the
// network (no FIN ever comes) is noticed by TCP keepalive within about a
// minute, and one that stops acknowledging what is sent within as long.
void watch_liveness(int fd);

// Sends/receives exactly n bytes on a blocking socket. False on EOF/error.
bool send_all(int fd, const void* buf, size_t n);
bool recv_all(int fd, void* buf, size_t n);

// Says hello for region `name` and reads the descriptor. Throws Error with
// the server's answer (kNotFound, kProtocol, ...).
RegionDescriptor handshake(int fd, const std::string& name, unsigned timeout_ms, const std::string& peer,
                           uint8_t flags = 0);

void set_io_timeout(int fd, unsigned timeout_ms);

}  // namespace pagewire::tcp
