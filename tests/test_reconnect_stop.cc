// A channel reconnecting to a source that is gone gives up at once when its
// stop descriptor fires (the region is being destroyed), rather than at its
// reconnect deadline; a descriptor that only wakes does not cut it short.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <memory>
#include <thread>

#include "common/unique_fd.h"
#include "pagewire/server.h"
#include "tests/test_util.h"
#include "transport/tcp/tcp_transport.h"

namespace pagewire {
namespace {

constexpr size_t kPage = 4096;
constexpr size_t kLength = 16 * kPage;
constexpr uint64_t kStopToken = 7;
constexpr uint64_t kWakeToken = 8;

// Listens where the source was and hangs up on every connection before
// its hello is answered: each reconnect attempt reaches it and fails. Once
// `fire_after` attempts have come, writes `fire_fd` (if not -1).
class HangUpListener {
 public:
  HangUpListener(uint16_t port, int fire_after, int fire_fd) {
    listen_fd_.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!listen_fd_) throw_errno("socket");
    int one = 1;
    ::setsockopt(listen_fd_.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(listen_fd_.get(), reinterpret_cast<const sockaddr*>(&a), sizeof a) != 0) throw_errno("bind");
    if (::listen(listen_fd_.get(), 16) != 0) throw_errno("listen");
    quit_.reset(::eventfd(0, EFD_CLOEXEC));
    thread_ = std::thread([this, fire_after, fire_fd] {
      for (;;) {
        pollfd fds[2] = {{listen_fd_.get(), POLLIN, 0}, {quit_.get(), POLLIN, 0}};
        if (::poll(fds, 2, -1) <= 0 || fds[1].revents != 0) return;
        UniqueFd c(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
        if (!c) continue;
        c.reset();
        if (++attempts_ == fire_after && fire_fd >= 0) {
          const uint64_t fire = 1;
          [[maybe_unused]] ssize_t w = ::write(fire_fd, &fire, sizeof fire);
        }
      }
    });
  }
  ~HangUpListener() {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t w = ::write(quit_.get(), &one, sizeof one);
    thread_.join();
  }
  int attempts() const { return attempts_.load(); }

 private:
  UniqueFd listen_fd_;
  UniqueFd quit_;
  std::atomic<int> attempts_{0};
  std::thread thread_;
};

class ReconnectStop : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    source_ = Mapping::anonymous(kLength);
    for (size_t i = 0; i < kLength; ++i) source_.data()[i] = static_cast<std::byte>((i * 131 + i / kPage) & 0xff);
    staging_ = Mapping::anonymous(2 * kPage);
    server_ = std::make_unique<MemoryServer>(testing::loopback_tcp());
    server_->export_memory("r", source_.data(), kLength);
    port_ = server_->port();
  }

  // A channel that has read its first page, byte for byte, from the source.
  std::unique_ptr<Channel> open(tcp::TcpTransport& transport) {
    auto channel = transport.open_channel();
    channel->register_buffer(staging_.data(), staging_.size());
    const ReadOp op{0, kPage, staging_.data(), 1};
    channel->post({&op, 1});
    WaitResult r;
    for (int i = 0; i < 100 && r.completions.empty(); ++i) channel->wait(r, 100);
    EXPECT_EQ(r.completions.size(), 1u);
    for (const ReadCompletion& c : r.completions) EXPECT_EQ(c.status, Errc::kOk);
    EXPECT_EQ(std::memcmp(staging_.data(), source_.data(), kPage), 0);
    return channel;
  }

  TransportOptions options(unsigned reconnect_timeout_ms) const {
    TransportOptions o;
    o.io_uring = GetParam();
    o.request_timeout_ms = 120000;
    o.reconnect_timeout_ms = reconnect_timeout_ms;
    return o;
  }

  Mapping source_;
  Mapping staging_;
  std::unique_ptr<MemoryServer> server_;
  uint16_t port_ = 0;
};

INSTANTIATE_TEST_SUITE_P(Io, ReconnectStop, ::testing::Values(true, false),
                         [](const auto& p) { return p.param ? "io_uring" : "syscalls"; });

TEST_P(ReconnectStop, StopEndsAReconnectInProgress) {
  // Two minutes to reconnect: a reconnect that waited out its deadline
  // would end with kClosed, and the test would still end in bounded time.
  tcp::TcpTransport transport("127.0.0.1", port_, "r", options(120000));
  auto channel = open(transport);
  UniqueFd stop(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  ASSERT_TRUE(stop);
  channel->watch(stop.get(), kStopToken, WatchRole::kStop);

  server_.reset();  // the source is gone
  // Stop fires only once two reconnect attempts have failed: the reconnect
  // is in progress when it does.
  HangUpListener listener(port_, 2, stop.get());
  const ReadOp op{kPage, kPage, staging_.data() + kPage, 2};
  channel->post({&op, 1});
  WaitResult r;
  auto waited = std::async(std::launch::async, [&] {
    for (int i = 0; i < 1000 && r.woken_tokens.empty() && r.completions.empty(); ++i) channel->wait(r, -1);
  });
  ASSERT_EQ(waited.wait_for(std::chrono::seconds(60)), std::future_status::ready) << "the stop did not end the wait";
  EXPECT_GE(listener.attempts(), 2);
  EXPECT_NE(std::find(r.woken_tokens.begin(), r.woken_tokens.end(), kStopToken), r.woken_tokens.end());
  ASSERT_EQ(r.completions.size(), 1u);
  EXPECT_EQ(r.completions[0].cookie, 2u);
  EXPECT_EQ(r.completions[0].status, Errc::kCancelled);
  EXPECT_EQ(r.channel_error, Errc::kCancelled);
  EXPECT_NE(r.channel_error_text.find("stopped while reconnecting"), std::string::npos) << r.channel_error_text;
  EXPECT_EQ(channel->reconnects(), 0u);

  // Dead for good: a later read fails at once, with the same reason.
  const ReadOp again{0, kPage, staging_.data(), 3};
  channel->post({&again, 1});
  WaitResult later;
  channel->wait(later, 0);
  ASSERT_EQ(later.completions.size(), 1u);
  EXPECT_EQ(later.completions[0].status, Errc::kCancelled);
}

TEST_P(ReconnectStop, AWakingDescriptorDoesNotEndAReconnect) {
  // Readable all along, but only kWake: the reconnect runs to its deadline
  // and the read fails with why the connection broke.
  tcp::TcpTransport transport("127.0.0.1", port_, "r", options(300));
  auto channel = open(transport);
  UniqueFd wake(::eventfd(1, EFD_CLOEXEC | EFD_NONBLOCK));
  ASSERT_TRUE(wake);
  channel->watch(wake.get(), kWakeToken);

  server_.reset();
  HangUpListener listener(port_, -1, -1);
  const ReadOp op{kPage, kPage, staging_.data() + kPage, 2};
  channel->post({&op, 1});
  WaitResult r;
  auto waited = std::async(std::launch::async, [&] {
    for (int i = 0; i < 1000 && r.channel_error == Errc::kOk; ++i) channel->wait(r, 100);
  });
  ASSERT_EQ(waited.wait_for(std::chrono::seconds(60)), std::future_status::ready) << "the wait hangs";
  ASSERT_EQ(r.completions.size(), 1u);
  EXPECT_EQ(r.completions[0].cookie, 2u);
  EXPECT_NE(r.completions[0].status, Errc::kCancelled);
  EXPECT_NE(r.channel_error, Errc::kCancelled);
  EXPECT_NE(r.channel_error_text.find("reconnect failed"), std::string::npos) << r.channel_error_text;
}

}  // namespace
}  // namespace pagewire
