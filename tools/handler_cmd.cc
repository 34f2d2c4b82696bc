#include "tools/handler_cmd.h"

#include <signal.h>

#include <cstdio>

#include "pagewire/error.h"
#include "pagewire/handler.h"

namespace pagewire::cli {

int cmd_handler(const HandlerCommand& h) {
  if (h.sockets.size() != h.sources.size()) {
    std::fprintf(stderr, "pagewire handler: %zu --socket and %zu --source: give one --source for each --socket\n",
                 h.sockets.size(), h.sources.size());
    return 2;
  }
  std::vector<HandlerServer::Listener> listeners;
  for (size_t i = 0; i < h.sockets.size(); ++i) listeners.push_back({h.sockets[i], h.sources[i]});
  HandlerOptions o;
  o.attach = h.options;
  o.handshake_timeout_ms = h.handshake_timeout_ms;
  // Blocked before any thread starts (they inherit the mask): only this
  // thread takes them, in sigwait.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  HandlerServer server(std::move(listeners), o);
  for (const std::string& s : h.sockets) std::printf("pagewire handler: listening on %s\n", s.c_str());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&stop, &sig);
  std::printf("pagewire handler: %s: stopping (%zu processes still served: their missing pages are refused)\n",
              sig == SIGINT ? "SIGINT" : "SIGTERM", server.active());
  server.stop();
  const std::vector<HandlerReport> done = server.finished();
  size_t served = 0;
  size_t refused = 0;
  for (const HandlerReport& r : done) (r.served ? served : refused) += 1;
  std::printf("pagewire handler: %zu processes served, %zu handshakes refused\n", served, refused);
  return 0;
}

}  // namespace pagewire::cli
