#include "transport/rdma/verbs.h"

#include <fcntl.h>
#include <poll.h>

#include <cerrno>
#include <cstring>

#include "common/unique_fd.h"

namespace pagewire::rdma {

EventChannel make_event_channel() {
  rdma_event_channel* ec = rdma_create_event_channel();
  if (ec == nullptr) {
    throw Error(Errc::kConnectFailed, std::string("rdma_create_event_channel: ") + std::strerror(errno) +
                                          " (no RDMA device or rdma_ucm module: see `pagewire info`)");
  }
  ::fcntl(ec->fd, F_SETFL, ::fcntl(ec->fd, F_GETFL) | O_NONBLOCK);
  return EventChannel(ec);
}

rdma_cm_event* next_event(rdma_event_channel* ec, int timeout_ms) {
  for (;;) {
    rdma_cm_event* ev = nullptr;
    if (rdma_get_cm_event(ec, &ev) == 0) return ev;
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) throw_errno("rdma_get_cm_event");
    pollfd p{ec->fd, POLLIN, 0};
    const int rc = ::poll(&p, 1, timeout_ms);
    if (rc == 0) return nullptr;
    if (rc < 0 && errno != EINTR) throw_errno("poll on rdma event channel");
  }
}

bool have_device() {
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list != nullptr) ibv_free_device_list(list);
  return n > 0;
}

const char* wc_status(ibv_wc_status s) { return ibv_wc_status_str(s); }

}  // namespace pagewire::rdma
