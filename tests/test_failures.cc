// Bad input and failures: each one ends in a clear error, never a hang and
// never a page of zeros where the source had data.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <future>
#include <random>
#include <thread>
#include <vector>

#include "tests/test_util.h"
#include "tools/pattern.h"
#include "transport/protocol.h"
#include "transport/tcp/socket_util.h"
#include "transport/transport.h"

namespace pagewire {
namespace {

using testing::attach_error;
using testing::ChildServer;
using testing::kSeed;
using testing::PatternServer;
using testing::run_catching_signals;
using testing::SilentServer;
using testing::touch;

constexpr size_t kPage = 4096;

UniqueFd raw_connect(uint16_t port) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return {};
  tcp::set_io_timeout(fd.get(), 5000);
  return fd;
}

// Attaches region `name` by hand and returns the socket, ready for reads.
UniqueFd raw_attach(uint16_t port, const std::string& name, wire::HelloReply* reply) {
  UniqueFd fd = raw_connect(port);
  EXPECT_TRUE(testing::raw_hello(fd.get(), name, 0, reply));
  if (reply->status != 0) return fd;
  uint64_t identity = 0;
  EXPECT_TRUE(tcp::recv_all(fd.get(), &identity, sizeof identity));
  std::vector<char> zero_map(reply->zero_map_bytes);
  EXPECT_TRUE(tcp::recv_all(fd.get(), zero_map.data(), zero_map.size()));
  return fd;
}

// True once the server has closed the connection (recv sees EOF or reset).
TEST(Failures, MalformedUri) {
  std::string what;
  EXPECT_EQ(attach_error("tcp//127.0.0.1:1/x", &what), Errc::kBadUri);
  EXPECT_NE(what.find("expected tcp://HOST:PORT/NAME"), std::string::npos) << what;
  EXPECT_EQ(attach_error("tcp://127.0.0.1:70000/x"), Errc::kBadUri);
}

TEST(Failures, UnknownRegionName) {
  PatternServer src("known", 1 << 20);
  std::string what;
  const std::string uri = "tcp://127.0.0.1:" + std::to_string(src.server().port()) + "/unknown";
  EXPECT_EQ(attach_error(uri, &what), Errc::kNotFound);
  EXPECT_NE(what.find("no region named 'unknown'"), std::string::npos) << what;
}

TEST(Failures, NothingListening) {
  // Bind a port and close it again so that nothing listens there.
  uint16_t port;
  {
    ServerOptions o;
    o.bind_address = "127.0.0.1";
    o.port = 0;
    MemoryServer s(o);
    port = s.port();
  }
  std::string what;
  EXPECT_EQ(attach_error("tcp://127.0.0.1:" + std::to_string(port) + "/x", &what), Errc::kConnectFailed);
  EXPECT_NE(what.find("Connection refused"), std::string::npos) << what;
}

TEST(Failures, GarbageAndTruncatedRequestsAreDroppedOthersServed) {
  PatternServer src("r", 1 << 20);
  const uint16_t port = src.server().port();
  Region healthy = attach(src.uri(), testing::on_demand());
  EXPECT_EQ(check_pattern(healthy.data(), 0, kPage, kSeed), -1);

  {  // Garbage instead of a hello.
    UniqueFd fd = raw_connect(port);
    const char junk[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    ASSERT_TRUE(tcp::send_all(fd.get(), junk, sizeof junk));
    EXPECT_TRUE(testing::closed_by_peer(fd.get()));
  }
  {  // A valid hello, then garbage where reads belong.
    wire::HelloReply reply{};
    UniqueFd fd = raw_attach(port, "r", &reply);
    ASSERT_EQ(reply.status, 0u);
    std::vector<uint8_t> junk(48);
    std::mt19937 rng(5);
    for (auto& b : junk) b = static_cast<uint8_t>(rng());
    ASSERT_TRUE(tcp::send_all(fd.get(), junk.data(), junk.size()));
    wire::ReadReply rr{};
    ASSERT_TRUE(tcp::recv_all(fd.get(), &rr, sizeof rr));
    EXPECT_EQ(static_cast<Errc>(rr.status), Errc::kProtocol);
    EXPECT_TRUE(testing::closed_by_peer(fd.get()));
  }
  {  // A truncated request, then the client hangs up.
    wire::HelloReply reply{};
    UniqueFd fd = raw_attach(port, "r", &reply);
    wire::ReadRequest req{wire::kReadMagic, reply.key, 0, kPage, 1};
    ASSERT_TRUE(tcp::send_all(fd.get(), &req, sizeof req / 2));
  }
  {  // A truncated hello.
    UniqueFd fd = raw_connect(port);
    wire::Hello h{wire::kHelloMagic, wire::kVersion, 10, 0};
    ASSERT_TRUE(tcp::send_all(fd.get(), &h, sizeof h));
    ASSERT_TRUE(tcp::send_all(fd.get(), "abc", 3));
  }
  // The server drops those three and keeps serving the others.
  for (int i = 0; i < 200 && src.server().stats().connections_dropped < 4; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_GE(src.server().stats().connections_dropped, 3u);
  EXPECT_EQ(check_pattern(healthy.data(), 0, healthy.size(), kSeed), -1);
  Region fresh = attach(src.uri(), testing::on_demand());
  EXPECT_EQ(check_pattern(fresh.data(), 0, fresh.size(), kSeed), -1);
}

TEST(Failures, ReadOutsideTheRegionIsRefusedByTheServer) {
  PatternServer src("r", 1 << 20);
  wire::HelloReply reply{};
  UniqueFd fd = raw_attach(src.server().port(), "r", &reply);
  ASSERT_EQ(reply.length, 1u << 20);
  // One good read, then one that runs past the end.
  wire::ReadRequest reqs[2] = {{wire::kReadMagic, reply.key, 0, 64, 1},
                               {wire::kReadMagic, reply.key, (1 << 20) - 64, 128, 2}};
  ASSERT_TRUE(tcp::send_all(fd.get(), reqs, sizeof reqs));
  wire::ReadReply rr{};
  std::vector<std::byte> payload(64);
  ASSERT_TRUE(tcp::recv_all(fd.get(), &rr, sizeof rr));
  EXPECT_EQ(rr.status, 0u);
  ASSERT_TRUE(tcp::recv_all(fd.get(), payload.data(), 64));
  EXPECT_EQ(check_pattern(payload.data(), 0, 64, kSeed), -1);
  ASSERT_TRUE(tcp::recv_all(fd.get(), &rr, sizeof rr));
  EXPECT_EQ(static_cast<Errc>(rr.status), Errc::kOutOfBounds);
  EXPECT_EQ(rr.tag, 2u);
  EXPECT_TRUE(testing::closed_by_peer(fd.get()));
  EXPECT_EQ(src.server().stats().reads_refused, 1u);
}

TEST(Failures, ReadOutsideTheRegionIsRefusedByTheChannel) {
  PatternServer src("r", 1 << 20);
  auto t = connect_transport(src.uri(), {});
  auto ch = t->open_channel();
  std::vector<std::byte> buf(2 * kPage);
  ch->register_buffer(buf.data(), buf.size());
  const ReadOp ops[] = {{(1 << 20) - kPage, kPage, buf.data(), 1},
                        {1 << 20, kPage, buf.data() + kPage, 2},
                        {~uint64_t{0} - 10, kPage, buf.data() + kPage, 3}};
  ch->post(ops);
  WaitResult res;
  for (int i = 0; i < 100 && res.completions.size() < 3; ++i) ch->wait(res, 1000);
  ASSERT_EQ(res.completions.size(), 3u);
  for (const auto& c : res.completions) {
    EXPECT_EQ(c.status, c.cookie == 1 ? Errc::kOk : Errc::kOutOfBounds) << c.cookie;
  }
  EXPECT_EQ(check_pattern(buf.data(), (1 << 20) - kPage, kPage, kSeed), -1);
  EXPECT_EQ(src.server().stats().reads_refused, 0u);  // never sent
}

TEST(Failures, ConnectionsBeyondTheLimitAreToldTheServerIsBusy) {
  ServerOptions o;
  o.port = 0;
  o.rdma = RdmaServing::kOff;
  o.max_connections = 1;
  PatternServer src("one", 1 << 20, kSeed, o);
  wire::HelloReply reply{};
  UniqueFd held = raw_attach(src.server().port(), "one", &reply);  // the one connection
  ASSERT_EQ(reply.status, 0u);
  std::string what;
  EXPECT_EQ(testing::attach_error(src.uri(), &what, 1000), Errc::kBusy) << what;
  EXPECT_NE(what.find("all its connections in use"), std::string::npos) << what;
  // Once the connection is given back, the next one gets in.
  held.reset();
  for (int i = 0; i < 100 && src.server().stats().connections_active != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  held = raw_attach(src.server().port(), "one", &reply);
  EXPECT_EQ(reply.status, 0u);
  EXPECT_EQ(reply.length, 1u << 20);
}

TEST(Failures, ConnectTriesEveryAddressTheHostResolvesTo) {
  // "localhost" may resolve to ::1 first and 127.0.0.1 after, and a
  // server on 0.0.0.0 listens on the second only.
  PatternServer src("both", 1 << 20);
  tcp::Endpoint ep = tcp::resolve("127.0.0.1", src.server().port());
  tcp::Address v6{};
  auto* a6 = reinterpret_cast<sockaddr_in6*>(&v6.addr);
  a6->sin6_family = AF_INET6;
  a6->sin6_port = htons(src.server().port());
  a6->sin6_addr = in6addr_loopback;
  v6.addr_len = sizeof(sockaddr_in6);
  ep.addresses.insert(ep.addresses.begin(), v6);
  std::string why;
  UniqueFd fd = tcp::connect_to(ep, 2000, &why);
  ASSERT_TRUE(fd) << why;
  const RegionDescriptor d = tcp::handshake(fd.get(), "both", 2000, ep.text);
  EXPECT_EQ(d.length, 1u << 20);
  // With no address answering, the error names what each said.
  ep.addresses.erase(ep.addresses.begin() + 1);
  EXPECT_FALSE(tcp::connect_to(ep, 2000, &why));
  EXPECT_NE(why.find("connect to"), std::string::npos) << why;
}

TEST(Failures, AnotherProtocolVersionIsToldSo) {
  PatternServer src("old", 1 << 20);
  UniqueFd fd = raw_connect(src.server().port());
  ASSERT_TRUE(fd);
  const std::string name = "old";
  wire::Hello h{wire::kHelloMagic, static_cast<uint16_t>(wire::kVersion + 1), static_cast<uint8_t>(name.size()), 0};
  ASSERT_TRUE(tcp::send_all(fd.get(), &h, sizeof h));
  ASSERT_TRUE(tcp::send_all(fd.get(), name.data(), name.size()));
  wire::HelloReply reply{};
  ASSERT_TRUE(tcp::recv_all(fd.get(), &reply, sizeof reply));
  EXPECT_EQ(static_cast<Errc>(reply.status), Errc::kProtocol);
  EXPECT_EQ(reply.server_version, wire::kVersion);
  EXPECT_TRUE(testing::closed_by_peer(fd.get()));
}

TEST(Failures, ServerWatchesItsConnectionsForDeadPeers) {
  // A destination whose host dies sends no FIN: the server's side must
  // find out by itself (keepalive, and a limit on unacknowledged sends)
  // rather than hold a thread and a connection slot for good.
  PatternServer src("live", 1 << 20);
  wire::HelloReply reply{};
  UniqueFd attached = raw_attach(src.server().port(), "live", &reply);
  sockaddr_in mine{};
  socklen_t len = sizeof mine;
  ASSERT_EQ(::getsockname(attached.get(), reinterpret_cast<sockaddr*>(&mine), &len), 0);
  // The server runs in this process: find its end of the connection.
  int found = 0;
  for (int s = 0; s < 1024; ++s) {
    sockaddr_in peer{};
    len = sizeof peer;
    if (s == attached.get() || ::getpeername(s, reinterpret_cast<sockaddr*>(&peer), &len) != 0) continue;
    if (peer.sin_family != AF_INET || peer.sin_port != mine.sin_port) continue;
    int keepalive = 0;
    unsigned user_timeout = 0;
    len = sizeof keepalive;
    ASSERT_EQ(::getsockopt(s, SOL_SOCKET, SO_KEEPALIVE, &keepalive, &len), 0);
    len = sizeof user_timeout;
    ASSERT_EQ(::getsockopt(s, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, &len), 0);
    EXPECT_EQ(keepalive, 1);
    EXPECT_GT(user_timeout, 0u);
    ++found;
  }
  EXPECT_EQ(found, 1);
}

TEST(Failures, ExportedNamesMustBeNameableByAUri) {
  ServerOptions options;
  options.bind_address = "127.0.0.1";
  options.port = 0;
  options.rdma = RdmaServing::kOff;
  MemoryServer server(options);
  std::vector<std::byte> mem(4096);
  for (const std::string& bad : {std::string("a/b"), std::string("a b"), std::string(), std::string(256, 'x')}) {
    try {
      server.export_memory(bad, mem.data(), mem.size());
      ADD_FAILURE() << "'" << bad << "' was exported";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Errc::kInvalidArgument) << e.what();
    }
  }
  server.export_memory(std::string(255, 'x'), mem.data(), mem.size());
}

class SilentPeer : public ::testing::TestWithParam<bool> {};
INSTANTIATE_TEST_SUITE_P(Io, SilentPeer, ::testing::Values(true, false),
                         [](const auto& p) { return p.param ? "io_uring" : "syscalls"; });

TEST_P(SilentPeer, TimesOutAndIsRefused) {
  SilentServer silent("quiet", 1 << 20);
  AttachOptions o = testing::on_demand();
  o.io_uring = GetParam();
  o.handler_threads = 1;
  o.request_timeout_ms = 200;
  o.reconnect_timeout_ms = 200;
  Region r = attach("tcp://127.0.0.1:" + std::to_string(silent.port()) + "/quiet", o);
  auto sig = std::async(std::launch::async, [&] { return run_catching_signals([&] { touch(r.data()); }); });
  ASSERT_EQ(sig.wait_for(std::chrono::seconds(30)), std::future_status::ready) << "the fault hangs";
  const int s = sig.get();
  EXPECT_TRUE(s == SIGBUS || s == SIGSEGV) << s;
  EXPECT_TRUE(r.failed());
  EXPECT_NE(r.error().find("timed out"), std::string::npos) << r.error();
}

TEST(Failures, DestroyWithFaultsPendingDoesNotHang) {
  SilentServer silent("quiet", 1 << 20);
  AttachOptions o = testing::on_demand();
  o.handler_threads = 2;
  o.request_timeout_ms = 60000;  // the reads would wait a minute
  auto r = std::make_unique<Region>(attach("tcp://127.0.0.1:" + std::to_string(silent.port()) + "/quiet", o));
  std::byte* base = r->data();
  std::atomic<int> parked{0};
  std::vector<std::future<int>> faults;
  for (int t = 0; t < 3; ++t) {
    faults.push_back(std::async(std::launch::async, [&, t] {
      return run_catching_signals([&] {
        ++parked;
        touch(base + static_cast<size_t>(t) * kPage);
      });
    }));
  }
  while (parked.load() < 3) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // let them reach the fault
  auto destroyed = std::async(std::launch::async, [&] { r.reset(); });
  ASSERT_EQ(destroyed.wait_for(std::chrono::seconds(30)), std::future_status::ready) << "destroy hangs";
  for (auto& f : faults) {
    ASSERT_EQ(f.wait_for(std::chrono::seconds(30)), std::future_status::ready) << "a faulting thread hangs";
    EXPECT_EQ(f.get(), SIGSEGV);  // woken into an inaccessible region, not zeros
  }
}

}  // namespace
}  // namespace pagewire
