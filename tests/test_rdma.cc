// The fault path over rdma://: one-sided RDMA READs through rdma-core. Needs
// an RDMA device (Soft-RoCE under tools/rxe-vm in CI) and the address of an
// interface it is bound to in PAGEWIRE_RDMA_ADDR; skips with the reason
// otherwise, and fails instead when PAGEWIRE_REQUIRE_RDMA=1.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <future>
#include <map>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "common/auth.h"
#include "tests/test_util.h"
#include "tools/pattern.h"
#include "transport/endpoint.h"
#include "transport/rdma/verbs.h"
#include "transport/tcp/socket_util.h"

namespace pagewire {
namespace {

using testing::ChildServer;
using testing::kSeed;
using testing::PatternServer;
using testing::run_catching_signals;
using testing::verify_pages;

constexpr size_t kPage = 4096;

class Rdma : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* addr = std::getenv("PAGEWIRE_RDMA_ADDR");
    std::string why;
    if (!rdma::have_device()) {
      why = "no RDMA device here (ibv_devices lists none); run under tools/rxe-vm";
    } else if (addr == nullptr || *addr == '\0') {
      why = "PAGEWIRE_RDMA_ADDR (an address the RDMA device is bound to) is not set";
    }
    if (!why.empty()) {
      const char* require = std::getenv("PAGEWIRE_REQUIRE_RDMA");
      if (require != nullptr && std::string(require) == "1") FAIL() << why;
      GTEST_SKIP() << why;
    }
    addr_ = addr;
  }

  ServerOptions rdma_server() const {
    ServerOptions o;
    o.bind_address = "0.0.0.0";
    o.port = 0;
    o.rdma = RdmaServing::kOn;
    return o;
  }
  std::string uri(const std::string& scheme, uint16_t port, const std::string& name) const {
    return scheme + "://" + addr_ + ":" + std::to_string(port) + "/" + name;
  }

  std::string addr_;
};

AttachOptions handlers(unsigned n) {
  AttachOptions o = testing::on_demand();
  o.handler_threads = n;
  return o;
}

TEST_F(Rdma, SequentialMultiThreadedContentsAreExact) {
  PatternServer src("seq", 8 << 20, kSeed, rdma_server());
  Region r = attach(uri("rdma", src.server().port(), "seq"), handlers(2));
  std::vector<size_t> order(r.size() / kPage);
  std::iota(order.begin(), order.end(), 0);
  EXPECT_EQ(verify_pages(r, order, 3), 0u);
  EXPECT_EQ(r.stats().pages_fetched, order.size());
}

TEST_F(Rdma, ServesTcpAndRdmaAtOnceAndAutoPicksRdma) {
  PatternServer src("both", 4 << 20, kSeed, rdma_server());
  ASSERT_TRUE(src.server().serves_rdma());
  Region over_rdma = attach(uri("auto", src.server().port(), "both"), handlers(1));
  Region over_tcp = attach(uri("tcp", src.server().port(), "both"), handlers(1));
  EXPECT_EQ(over_rdma.transport(), "rdma");
  EXPECT_EQ(over_tcp.transport(), "tcp");
  auto a = std::async(std::launch::async, [&] { return check_pattern(over_rdma.data(), 0, over_rdma.size(), kSeed); });
  auto b = std::async(std::launch::async, [&] { return check_pattern(over_tcp.data(), 0, over_tcp.size(), kSeed); });
  EXPECT_EQ(a.get(), -1);
  EXPECT_EQ(b.get(), -1);
  EXPECT_GE(src.server().stats().rdma_connections_accepted, 1u);
}

TEST_F(Rdma, UnknownRegionIsRejected) {
  PatternServer src("known", 1 << 20, kSeed, rdma_server());
  std::string what;
  EXPECT_EQ(testing::attach_error(uri("rdma", src.server().port(), "unknown"), &what, 1000), Errc::kNotFound) << what;
}

TEST_F(Rdma, ConnectionsBeyondTheLimitAreRefusedAsBusy) {
  ServerOptions o = rdma_server();
  o.max_connections = 1;
  PatternServer src("one", 1 << 20, kSeed, o);
  Region first = attach(uri("rdma", src.server().port(), "one"), handlers(1));  // one connection
  EXPECT_EQ(check_pattern(first.data(), 0, 4096, kSeed), -1);
  std::string what;
  EXPECT_EQ(testing::attach_error(uri("rdma", src.server().port(), "one"), &what, 1000), Errc::kBusy) << what;
  EXPECT_NE(what.find("all its connections in use"), std::string::npos) << what;
}

TEST_F(Rdma, NothingListening) {
  uint16_t port;
  {
    PatternServer gone("gone", 1 << 20, kSeed, rdma_server());
    port = gone.server().port();
  }
  std::string what;
  const Errc e = testing::attach_error(uri("rdma", port, "gone"), &what, 1000);
  EXPECT_TRUE(e == Errc::kConnectFailed || e == Errc::kTimeout) << what;
  EXPECT_FALSE(what.empty());
}

TEST_F(Rdma, KeyedServerServesAKeyedDestinationThroughTickets) {
  // Every RDMA connection (each handler's, the pull's, and each reconnect)
  // brings a ticket it got over TCP by proving the key.
  testing::KeyFile key("a shared secret of 32 bytes, ok!");
  ServerOptions o = rdma_server();
  o.key_file = key.path();
  PatternServer src("keyed", 8 << 20, kSeed, o);
  ASSERT_TRUE(src.server().serves_rdma());
  AttachOptions a = handlers(2);
  a.key_file = key.path();
  a.reconnect_timeout_ms = 2000;
  Region r = attach(uri("rdma", src.server().port(), "keyed"), a);
  EXPECT_EQ(r.transport(), "rdma");
  EXPECT_EQ(check_pattern(r.data(), 0, 64 * kPage, kSeed), -1);
  // The rest after every connection was dropped: each comes back with a
  // ticket of its own.
  const uint64_t before = src.server().stats().rdma_connections_accepted;
  src.server().drop_connections();
  EXPECT_EQ(check_pattern(r.data(), 0, r.size(), kSeed), -1);
  EXPECT_FALSE(r.failed()) << r.error();
  EXPECT_GE(r.stats().reconnects, 1u);
  EXPECT_GT(src.server().stats().rdma_connections_accepted, before);
  // auto:// with the key picks RDMA too.
  Region over_auto = attach(uri("auto", src.server().port(), "keyed"), a);
  EXPECT_EQ(over_auto.transport(), "rdma");
  EXPECT_EQ(check_pattern(over_auto.data(), 0, 16 * kPage, kSeed), -1);
}

TEST_F(Rdma, PeerWithoutTheKeyIsRefusedBeforeItLearnsTheRegion) {
  testing::KeyFile key("a shared secret of 32 bytes, ok!");
  testing::KeyFile other("another secret, also long enough");
  ServerOptions o = rdma_server();
  o.key_file = key.path();
  PatternServer src("keyed", 1 << 20, kSeed, o);
  // No key: the RDMA connect brings no ticket, and is rejected with kAuth
  // (the reject's private data holds a status and zeros).
  std::string what;
  EXPECT_EQ(testing::attach_error(uri("rdma", src.server().port(), "keyed"), &what, 1000), Errc::kAuth) << what;
  // Another key: the TCP proof fails, so no ticket is ever issued.
  AttachOptions a = handlers(1);
  a.key_file = other.path();
  try {
    attach(uri("rdma", src.server().port(), "keyed"), a);
    ADD_FAILURE() << "a destination with another key was let in over RDMA";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kAuth) << e.what();
  }
  EXPECT_EQ(src.server().stats().rdma_connections_accepted, 0u);
}

// An RDMA connect with a hello of the test's own making: the status the
// server answered (kOk: accepted, and disconnected again at once).
Errc raw_rdma_connect(const std::string& addr, uint16_t port, const std::string& name, uint8_t flags, uint64_t ticket) {
  // Declared so that the id (and its QP) goes first, then the CQ and the
  // PD, and the event channel last.
  rdma::EventChannel events = rdma::make_event_channel();
  rdma::Pd pd;
  rdma::Cq cq;
  rdma_cm_id* raw = nullptr;
  if (rdma_create_id(events.get(), &raw, nullptr, RDMA_PS_TCP) != 0) return Errc::kIo;
  rdma::CmId id(raw);
  auto next = [&](rdma_cm_event_type want, rdma_cm_event** out) {
    pollfd pfd{events->fd, POLLIN, 0};
    if (::poll(&pfd, 1, 5000) <= 0 || rdma_get_cm_event(events.get(), out) != 0) return false;
    if ((*out)->event == want) return true;
    rdma_ack_cm_event(*out);  // the id waits for every event to be acked
    return false;
  };
  Endpoint ep = resolve(addr, port);
  rdma_cm_event* ev = nullptr;
  if (rdma_resolve_addr(id.get(), nullptr, reinterpret_cast<sockaddr*>(&ep.addr), 2000) != 0 ||
      !next(RDMA_CM_EVENT_ADDR_RESOLVED, &ev)) {
    return Errc::kConnectFailed;
  }
  rdma_ack_cm_event(ev);
  if (rdma_resolve_route(id.get(), 2000) != 0 || !next(RDMA_CM_EVENT_ROUTE_RESOLVED, &ev)) return Errc::kConnectFailed;
  rdma_ack_cm_event(ev);
  pd.reset(ibv_alloc_pd(id->verbs));
  cq.reset(ibv_create_cq(id->verbs, 2, nullptr, nullptr, 0));
  ibv_qp_init_attr qa{};
  qa.send_cq = cq.get();
  qa.recv_cq = cq.get();
  qa.qp_type = IBV_QPT_RC;
  qa.cap.max_send_wr = 1;
  qa.cap.max_recv_wr = 1;
  qa.cap.max_send_sge = 1;
  qa.cap.max_recv_sge = 1;
  if (!pd || !cq || rdma_create_qp(id.get(), pd.get(), &qa) != 0) return Errc::kIo;
  rdma::Hello hello{};
  hello.magic = rdma::kHelloMagic;
  hello.version = rdma::kRdmaVersion;
  hello.name_length = static_cast<uint8_t>(name.size());
  hello.flags = flags;
  hello.ticket = ticket;
  std::memcpy(hello.name, name.data(), name.size());
  rdma_conn_param param{};
  param.private_data = &hello;
  param.private_data_len = sizeof hello;
  param.initiator_depth = 1;
  param.retry_count = 7;
  param.rnr_retry_count = 7;
  if (rdma_connect(id.get(), &param) != 0) return Errc::kConnectFailed;
  pollfd pfd{events->fd, POLLIN, 0};
  if (::poll(&pfd, 1, 5000) <= 0 || rdma_get_cm_event(events.get(), &ev) != 0) return Errc::kTimeout;
  Errc status = Errc::kProtocol;
  if (ev->event == RDMA_CM_EVENT_ESTABLISHED) {
    status = Errc::kOk;
  } else if (ev->event == RDMA_CM_EVENT_REJECTED && ev->param.conn.private_data != nullptr &&
             ev->param.conn.private_data_len >= sizeof(rdma::HelloReply)) {
    rdma::HelloReply reply{};
    std::memcpy(&reply, ev->param.conn.private_data, sizeof reply);
    status = static_cast<Errc>(reply.status);
  }
  rdma_ack_cm_event(ev);
  if (status == Errc::kOk) rdma_disconnect(id.get());
  return status;
}

TEST_F(Rdma, ForgedAndReplayedTicketsAreRefused) {
  testing::KeyFile key("a shared secret of 32 bytes, ok!");
  ServerOptions o = rdma_server();
  o.key_file = key.path();
  PatternServer src("keyed", 1 << 20, kSeed, o);
  // No ticket, and a made-up one: refused, before any rkey or address.
  EXPECT_EQ(raw_rdma_connect(addr_, src.server().port(), "keyed", 0, 0), Errc::kAuth);
  EXPECT_EQ(raw_rdma_connect(addr_, src.server().port(), "keyed", rdma::kRdmaTicket, 0x1234567890abcdefull),
            Errc::kAuth);
  // A real ticket, got over TCP by proving the key: good once, for its own
  // region only, then never again.
  const auto k = AuthKey::load(key.path());
  auto get_ticket = [&] {
    std::string why;
    UniqueFd fd = tcp::connect_to(tcp::resolve("127.0.0.1", src.server().port()), 2000, &why);
    EXPECT_TRUE(fd) << why;
    return tcp::handshake(fd.get(), "keyed", 2000, "the server", wire::kHelloTicket, 0, k.get()).ticket;
  };
  const uint64_t ticket = get_ticket();
  ASSERT_NE(ticket, 0u);
  EXPECT_EQ(raw_rdma_connect(addr_, src.server().port(), "keyed", rdma::kRdmaTicket, ticket), Errc::kOk);
  EXPECT_EQ(raw_rdma_connect(addr_, src.server().port(), "keyed", rdma::kRdmaTicket, ticket), Errc::kAuth);
  const uint64_t other = get_ticket();
  EXPECT_EQ(raw_rdma_connect(addr_, src.server().port(), "another", rdma::kRdmaTicket, other), Errc::kAuth);
  EXPECT_EQ(src.server().stats().rdma_connections_accepted, 1u);
}

// A node's writer connects over RDMA with a ticket that names its lease,
// got over TCP. No ticket, a forged one or a reader's makes no writer, and
// a read-only export takes none; while a writer holds the lease, others are
// refused over RDMA and TCP alike; a reader's channel cannot write.
TEST_F(Rdma, OnlyTheLeaseholderWritesANode) {
  MemoryServer server(rdma_server());
  server.export_node("node", 1 << 20);
  Mapping ro = Mapping::anonymous(1 << 20);
  server.export_memory("ro", ro.data(), ro.size());
  const uint16_t port = server.port();
  auto ticket = [&](const std::string& name, uint8_t flags) {
    std::string why;
    UniqueFd fd = tcp::connect_to(tcp::resolve("127.0.0.1", port), 2000, &why);
    EXPECT_TRUE(fd) << why;
    return tcp::handshake(fd.get(), name, 2000, "the server", flags, 0, nullptr).ticket;
  };
  const uint8_t writer = rdma::kRdmaTicket | rdma::kRdmaWriter;
  EXPECT_EQ(raw_rdma_connect(addr_, port, "node", rdma::kRdmaWriter, 0), Errc::kAuth);
  EXPECT_EQ(raw_rdma_connect(addr_, port, "node", writer, 0x1234567890abcdefull), Errc::kAuth);
  EXPECT_EQ(raw_rdma_connect(addr_, port, "node", writer, ticket("node", wire::kHelloTicket)), Errc::kLeased);
  EXPECT_EQ(raw_rdma_connect(addr_, port, "node", writer, ticket("node", wire::kHelloTicket | wire::kHelloWriter)),
            Errc::kOk);
  try {
    ticket("ro", wire::kHelloTicket | wire::kHelloWriter);
    ADD_FAILURE() << "a read-only export granted a writer's ticket";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kUnsupported) << e.what();
  }
  // A cache over RDMA holds the lease: nobody else writes.
  AttachOptions o = handlers(1);
  o.cache_bytes = 256 << 10;
  o.reconnect_timeout_ms = 500;
  Region held = [&] {
    for (int tries = 0;; ++tries) {  // the raw writer's lease goes a moment after its disconnect
      try {
        return attach(uri("rdma", port, "node"), o);
      } catch (const Error& e) {
        if (e.code() != Errc::kLeased || tries > 200) throw;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
  }();
  EXPECT_EQ(held.transport(), "rdma");
  for (const char* scheme : {"rdma", "tcp"}) {
    try {
      Region other = attach(uri(scheme, port, "node"), o);
      ADD_FAILURE() << "a second writer attached over " << scheme;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Errc::kLeased) << scheme << ": " << e.what();
    }
  }
  // A reader shares the node, and its writes are refused.
  auto reader = connect_transport(uri("rdma", port, "node"), TransportOptions{});
  auto channel = reader->open_channel();
  Mapping page = Mapping::anonymous(kPage);
  channel->register_buffer(page.data(), page.size());
  const WriteOp op{0, static_cast<uint32_t>(kPage), page.data(), 7};
  channel->post_writes({&op, 1});
  WaitResult out;
  channel->wait(out, 1000);
  ASSERT_EQ(out.completions.size(), 1u);
  EXPECT_EQ(out.completions[0].status, Errc::kLeased);
  EXPECT_EQ(server.stats().writes_applied, 0u);
}

// More writes than the node has staging slots, posted at once: every one
// is applied whole and acked, a read after its ack finds it, and writes
// out of bounds or larger than a slot are refused without touching the
// node.
TEST_F(Rdma, AWritersPagesLandWholeAndReadBack) {
  constexpr size_t kPages = 256;
  MemoryServer server(rdma_server());
  server.export_node("node", kPages * kPage);
  TransportOptions t;
  t.writer = true;
  auto w = connect_transport(uri("rdma", server.port(), "node"), t);
  ASSERT_NE(w->region().lease, 0u);
  // A fresh node: its writer is told every page is zero.
  ASSERT_EQ(w->region().zero_map.size(), kPages / 64);
  for (uint64_t word : w->region().zero_map) EXPECT_EQ(word, ~uint64_t{0});
  auto channel = w->open_channel(ChannelUse::kWrite);
  Mapping buf = Mapping::anonymous(kPages * kPage);
  channel->register_buffer(buf.data(), buf.size());
  constexpr size_t kWrites = 3 * rdma::kWriteSlots / 2;
  std::vector<WriteOp> ops;
  for (size_t p = 0; p < kWrites; ++p) {
    fill_generation(buf.data() + p * kPage, p * kPage, kPage, 1);
    ops.push_back({p * kPage, static_cast<uint32_t>(kPage), buf.data() + p * kPage, p});
  }
  ops.push_back({kPages * kPage, static_cast<uint32_t>(kPage), buf.data(), 1000});  // past the end
  ops.push_back({0, static_cast<uint32_t>(2 * kPage), buf.data(), 1001});           // more than a slot
  channel->post_writes(ops);
  std::map<uint64_t, Errc> done;
  WaitResult out;
  for (int i = 0; i < 200 && done.size() < ops.size(); ++i) {
    out.clear();
    channel->wait(out, 100);
    ASSERT_EQ(out.channel_error, Errc::kOk) << out.channel_error_text;
    for (const ReadCompletion& c : out.completions) EXPECT_TRUE(done.emplace(c.cookie, c.status).second);
  }
  ASSERT_EQ(done.size(), ops.size());
  for (size_t p = 0; p < kWrites; ++p) EXPECT_EQ(done[p], Errc::kOk) << p;
  EXPECT_EQ(done[1000], Errc::kOutOfBounds);
  EXPECT_EQ(done[1001], Errc::kInvalidArgument);
  EXPECT_EQ(server.stats().writes_applied, kWrites);
  // The write channel's queue pair reaches the staging ring alone: it
  // cannot read. A read channel of the same destination reads it all back.
  const ReadOp stray{0, static_cast<uint32_t>(kPage), buf.data(), 77};
  channel->post({&stray, 1});
  out.clear();
  channel->wait(out, 1000);
  ASSERT_EQ(out.completions.size(), 1u);
  EXPECT_EQ(out.completions[0].status, Errc::kUnsupported);
  channel = w->open_channel();
  channel->register_buffer(buf.data(), buf.size());
  std::memset(buf.data(), 0xee, buf.size());
  std::vector<ReadOp> reads;
  for (size_t p = 0; p < kPages; ++p)
    reads.push_back({p * kPage, static_cast<uint32_t>(kPage), buf.data() + p * kPage, p});
  size_t read = 0;
  for (size_t from = 0; from < reads.size(); from += 64) {
    channel->post({reads.data() + from, std::min<size_t>(64, reads.size() - from)});
    const size_t want = read + std::min<size_t>(64, reads.size() - from);
    for (int i = 0; i < 200 && read < want; ++i) {
      out.clear();
      channel->wait(out, 100);
      for (const ReadCompletion& c : out.completions) read += c.status == Errc::kOk ? 1 : 0;
    }
  }
  ASSERT_EQ(read, kPages);
  for (size_t p = 0; p < kPages; ++p) {
    EXPECT_TRUE(holds_generation(buf.data() + p * kPage, p * kPage, kPage, p < kWrites ? 1 : 0)) << p;
  }
}

// The node drops every connection while a writer has writes out: the
// channel connects again (a new ticket, the same lease), posts every write
// not acked on the new queue pair, and each is acked once, whole.
TEST_F(Rdma, WritesOutWhenTheConnectionDropsAreSentAgain) {
  constexpr size_t kPages = 128;
  MemoryServer server(rdma_server());
  server.export_node("node", kPages * kPage);
  TransportOptions t;
  t.writer = true;
  t.reconnect_timeout_ms = 3000;
  auto w = connect_transport(uri("rdma", server.port(), "node"), t);
  auto channel = w->open_channel(ChannelUse::kWrite);
  Mapping buf = Mapping::anonymous(kPages * kPage);
  channel->register_buffer(buf.data(), buf.size());
  std::map<uint64_t, Errc> done;
  WaitResult out;
  for (uint64_t gen = 1; gen <= 3; ++gen) {
    std::vector<WriteOp> ops;
    for (size_t p = 0; p < kPages; ++p) {
      fill_generation(buf.data() + p * kPage, p * kPage, kPage, gen);
      ops.push_back({p * kPage, static_cast<uint32_t>(kPage), buf.data() + p * kPage, gen * kPages + p});
    }
    channel->post_writes(ops);
    server.drop_connections();
    done.clear();
    for (int i = 0; i < 300 && done.size() < ops.size(); ++i) {
      out.clear();
      channel->wait(out, 100);
      ASSERT_EQ(out.channel_error, Errc::kOk) << out.channel_error_text;
      for (const ReadCompletion& c : out.completions) EXPECT_TRUE(done.emplace(c.cookie, c.status).second);
    }
    ASSERT_EQ(done.size(), ops.size()) << "generation " << gen;
    for (const auto& [cookie, status] : done) EXPECT_EQ(status, Errc::kOk) << cookie;
  }
  EXPECT_GE(channel->reconnects(), 1u);
  // What a reader finds is the last generation, every page whole.
  AttachOptions o = handlers(2);
  o.background_pull = true;
  Region r = attach(uri("rdma", server.port(), "node"), o);
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(60)));
  for (size_t p = 0; p < kPages; ++p) EXPECT_TRUE(holds_generation(r.data() + p * kPage, p * kPage, kPage, 3)) << p;
}

TEST_F(Rdma, TooLongNameIsABadUri) {
  EXPECT_EQ(testing::attach_error(uri("rdma", 1, std::string(60, 'x')), nullptr, 1000), Errc::kBadUri);
}

}  // namespace
}  // namespace pagewire

namespace pagewire {
namespace {

TEST_F(Rdma, PostcopyPullCompletesWithExactBytes) {
  PatternServer src("pull", 16 << 20, kSeed, rdma_server());
  AttachOptions o = handlers(2);
  o.background_pull = true;
  o.prefetch = true;
  Region r = attach(uri("rdma", src.server().port(), "pull"), o);
  // Touch a few pages while the pull runs, then wait for the rest.
  for (size_t p = 0; p < r.size() / kPage; p += 97) {
    ASSERT_EQ(check_pattern(r.data() + p * kPage, p * kPage, kPage, kSeed), -1) << p;
  }
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(300))) << r.error();
  EXPECT_EQ(check_pattern(r.data(), 0, r.size(), kSeed), -1);
  const Stats s = r.stats();
  EXPECT_TRUE(s.complete);
  EXPECT_EQ(s.pages_pulled + s.pages_fetched + s.pages_zero, s.pages_total);
}

}  // namespace
}  // namespace pagewire

namespace pagewire {
namespace {

TEST_F(Rdma, ZeroPagesNeverCrossTheFabric) {
  const size_t len = 4 << 20;
  Mapping source = Mapping::anonymous(len);
  for (size_t p = 0; p < len / kPage; p += 2) fill_pattern(source.data() + p * kPage, p * kPage, kPage, kSeed);
  MemoryServer server(rdma_server());
  server.export_memory("half", source.data(), len);
  Region r = attach(uri("rdma", server.port(), "half"), handlers(2));
  EXPECT_EQ(std::memcmp(r.data(), source.data(), len), 0);
  const Stats s = r.stats();
  EXPECT_EQ(s.pages_zero, len / kPage / 2);
  EXPECT_EQ(s.bytes_fetched, len / 2);
}

}  // namespace
}  // namespace pagewire
