// Blocking socket helpers for the setup path (connect, handshake); the data
// path never uses them.
#pragma once

#include <sys/socket.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/auth.h"
#include "common/unique_fd.h"
#include "pagewire/error.h"
#include "transport/endpoint.h"
#include "transport/protocol.h"
#include "transport/transport.h"

namespace pagewire::tcp {

// The endpoint is shared with RDMA; callers that name it tcp::Endpoint and
// tcp::resolve still may.
using pagewire::Address;
using pagewire::Endpoint;
using pagewire::resolve;

// Connects to the first of the endpoint's addresses that answers, each
// within timeout_ms, and sets TCP_NODELAY. On failure returns an empty fd
// and fills *why. A connect still pending when `cancel_fd` (if not -1)
// becomes readable is abandoned: a region being torn down does not wait
// out a host that does not answer.
UniqueFd connect_to(const Endpoint& ep, unsigned timeout_ms, std::string* why, int cancel_fd = -1);

// A server's side of a connection: a peer whose host dies or drops off the
// network (no FIN ever comes) is noticed by TCP keepalive within about a
// minute, and one that stops acknowledging what is sent within as long.
void watch_liveness(int fd);

// Sends/receives exactly n bytes on a blocking socket. False on EOF/error.
bool send_all(int fd, const void* buf, size_t n);
bool recv_all(int fd, void* buf, size_t n);

// Says hello for region `name`, proves `key` (and checks the server's
// proof) when given, and reads the descriptor. Throws Error with the
// server's answer (kNotFound, kProtocol, kLeased, kAuth, ...). With
// wire::kHelloLease in `flags`, presents `lease`; with wire::kHelloWriter,
// the descriptor carries the lease granted.
RegionDescriptor handshake(int fd, const std::string& name, unsigned timeout_ms, const std::string& peer,
                           uint8_t flags = 0, uint64_t lease = 0, const AuthKey* key = nullptr);

void set_io_timeout(int fd, unsigned timeout_ms);

// recv_all, by a deadline for all of it: a peer that sends a byte at a time
// cannot stretch a handshake past the deadline.
bool recv_before(int fd, void* buf, size_t n, std::chrono::steady_clock::time_point deadline);

// Hangs up after a refusal so that the refusal arrives: closing with
// unread input would send a reset, and the peer's kernel could drop the
// reply before its reader saw it. Drains what the peer still sends for at
// most 200 ms in all.
void close_gracefully(int fd);

}  // namespace pagewire::tcp
