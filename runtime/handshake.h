// The handshake a VMM sends to its page-fault handler (see
// pagewire/handler.h): reading it off a Unix socket, with the userfaultfd
// it carries, and checking that descriptor.
#pragma once

#include <sys/types.h>

#include <string>

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

// Reads the handshake's body from `conn` until it is a whole JSON value (or
// the peer stops sending), within the options' time and size limits; the
// first descriptor it carries (SCM_RIGHTS) goes to *uffd, and any more are
// closed. Throws Error(kInvalidArgument / kTimeout) naming what is wrong.
// `stop_fd` (-1: none) readable ends the wait early (kCancelled).
std::string receive_handshake(int conn, const HandlerOptions& options, UniqueFd* uffd, int stop_fd = -1);

// Throws Error(kInvalidArgument) unless `fd` is a userfaultfd.
void check_userfaultfd(int fd);

}  // namespace pagewire
