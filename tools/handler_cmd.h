// `pagewire handler`: the page-fault handler daemon for VMMs (see
// pagewire/handler.h).
#pragma once

#include <string>
#include <vector>

#include "pagewire/region.h"

namespace pagewire::cli {

struct HandlerCommand {
  // Paired in order: connections to sockets[i] are served from sources[i].
  std::vector<std::string> sockets;
  std::vector<std::string> sources;
  AttachOptions options{};
  unsigned handshake_timeout_ms = 5000;
};

// Serves until SIGINT or SIGTERM; 0, or 2 when the options are wrong.
int cmd_handler(const HandlerCommand& h);

}  // namespace pagewire::cli
