// Blocking socket helpers for the setup path (connect, handshake); the data
// path never uses them.
#pragma once

#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "pagewire/error.h"
#include "runtime/unique_fd.h"
#include "transport/protocol.h"
#include "transport/transport.h"

namespace pagewire::tcp {

struct Endpoint {
  sockaddr_storage addr{};
  socklen_t addr_len = 0;
  std::string text;  // HOST:PORT, for messages
};

// Resolves host and port; throws Error(kConnectFailed) when it cannot.
Endpoint resolve(const std::string& host, uint16_t port);

// Connects within timeout_ms and sets TCP_NODELAY. On failure returns an
// empty fd and fills *why.
UniqueFd connect_to(const Endpoint& ep, unsigned timeout_ms, std::string* why);

// Sends/receives exactly n bytes on a blocking socket. False on EOF/error.
bool send_all(int fd, const void* buf, size_t n);
bool recv_all(int fd, void* buf, size_t n);

// Says hello for region `name` and reads the descriptor. Throws Error with
// the server's answer (kNotFound, kProtocol, ...).
RegionDescriptor handshake(int fd, const std::string& name, unsigned timeout_ms, const std::string& peer,
                           uint8_t flags = 0);

void set_io_timeout(int fd, unsigned timeout_ms);

}  // namespace pagewire::tcp
