// The handshake a VMM sends to its page-fault handler (see
// pagewire/handler.h): reading it off a Unix socket, with the userfaultfd
// it carries, and checking that descriptor.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "common/unique_fd.h"
#include "pagewire/handler.h"

namespace pagewire {

struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};
// SO_PEERCRED of a connected Unix socket; throws on failure.
PeerCredentials peer_credentials(int conn);

// The descriptors a handshake carries (SCM_RIGHTS): the userfaultfd, and
// for shared memory the memfd its mappings map.
struct HandshakeFds {
  UniqueFd uffd;
  UniqueFd memfd;
};

// Reads the handshake's body from `conn` until it is a whole JSON value (or
// the peer stops sending), within the options' time and size limits; the
// descriptors it carries go to *fds (a third and more are refused). Throws
// Error(kInvalidArgument / kTimeout) naming what is wrong. `stop_fd` (-1:
// none) readable ends the wait early (kCancelled).
std::string receive_handshake(int conn, const HandlerOptions& options, HandshakeFds* fds, int stop_fd = -1);

// Throws Error(kInvalidArgument) unless `fd` is a userfaultfd.
void check_userfaultfd(int fd);

// Checks the mappings against process `pid`'s own (/proc/PID/smaps), so
// that no page is installed where the handshake merely says memory is:
// every byte of each mapping must be mapped there and registered with its
// userfaultfd, for missing faults (anonymous memory) or, with `memfd` >= 0,
// for minor faults, mapping that memfd shared at the mapping's offset.
// Throws Error(kInvalidArgument) naming the first mapping that is not so.
// Where smaps cannot be read, anonymous memory is served on the
// handshake's word (with a warning) and shared memory is refused.
void check_guest_memory(pid_t pid, const std::vector<GuestMapping>& mappings, int memfd);

}  // namespace pagewire
