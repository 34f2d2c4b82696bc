// Memory nodes: zeroed memory a server owns that one destination at a time
// writes (over TCP) and any number read. Writes go through
// Channel::post_writes, mixed with reads; the server applies a write only
// once its whole payload is in, refuses writes to read-only exports, to
// writers without the lease and out of bounds, and goes on serving others.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tests/test_util.h"
#include "transport/local/local_transport.h"
#include "transport/protocol.h"
#include "transport/tcp/socket_util.h"
#include "transport/transport.h"

namespace pagewire {
namespace {

using testing::ChildServer;
using testing::loopback_tcp;
using testing::loopback_uri;

constexpr size_t kPage = 4096;
constexpr size_t kNodeBytes = 4u << 20;
constexpr size_t kNodePages = kNodeBytes / kPage;

// Content that names its page and generation: a page landing in the wrong
// place, or an old generation, reads wrong.
void fill_page(std::byte* p, uint64_t page, uint64_t generation) {
  std::mt19937_64 rng(page * 0x9e3779b97f4a7c15ull + generation);
  for (size_t i = 0; i < kPage; i += 8) {
    const uint64_t v = rng();
    std::memcpy(p + i, &v, 8);
  }
}

bool page_is(const std::byte* p, uint64_t page, uint64_t generation) {
  std::vector<std::byte> want(kPage);
  fill_page(want.data(), page, generation);
  return std::memcmp(p, want.data(), kPage) == 0;
}

bool all_zero(const std::byte* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != std::byte{0}) return false;
  }
  return true;
}

TransportOptions writer_options(bool io_uring = true) {
  TransportOptions t;
  t.writer = true;
  t.io_uring = io_uring;
  t.reconnect_timeout_ms = 1000;
  return t;
}

TransportOptions reader_options() {
  TransportOptions t;
  t.reconnect_timeout_ms = 1000;
  return t;
}

// Waits until every cookie in `want` has completed; returns each one's status.
std::map<uint64_t, Errc> complete(Channel& ch, size_t want, int limit_ms = 10000) {
  std::map<uint64_t, Errc> done;
  WaitResult w;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(limit_ms);
  while (done.size() < want && std::chrono::steady_clock::now() < deadline) {
    w.clear();
    ch.wait(w, 100);
    for (const ReadCompletion& c : w.completions) done[c.cookie] = c.status;
  }
  return done;
}

// Reads `pages` pages from `first` through a channel; each must complete kOk.
std::vector<std::byte> read_pages(Channel& ch, size_t first, size_t pages) {
  std::vector<std::byte> out(pages * kPage);
  for (size_t done = 0; done < pages;) {
    const size_t batch = std::min<size_t>(pages - done, 128);
    std::vector<ReadOp> ops;
    for (size_t i = 0; i < batch; ++i) {
      ops.push_back({(first + done + i) * kPage, kPage, out.data() + (done + i) * kPage, done + i});
    }
    ch.post(ops);
    const auto result = complete(ch, batch);
    EXPECT_EQ(result.size(), batch);
    for (const auto& [cookie, status] : result) EXPECT_EQ(status, Errc::kOk) << "read of page " << first + cookie;
    done += batch;
  }
  return out;
}

// Writes generation `generation` of pages [first, first+pages), each must
// complete kOk. `src` keeps the payloads until they complete.
void write_pages(Channel& ch, size_t first, size_t pages, uint64_t generation, std::vector<std::byte>& src) {
  src.resize(pages * kPage);
  for (size_t i = 0; i < pages; ++i) fill_page(src.data() + i * kPage, first + i, generation);
  for (size_t done = 0; done < pages;) {
    const size_t batch = std::min<size_t>(pages - done, 128);
    std::vector<WriteOp> ops;
    for (size_t i = 0; i < batch; ++i) {
      ops.push_back({(first + done + i) * kPage, kPage, src.data() + (done + i) * kPage, done + i});
    }
    ch.post_writes(ops);
    const auto result = complete(ch, batch);
    ASSERT_EQ(result.size(), batch);
    for (const auto& [cookie, status] : result) ASSERT_EQ(status, Errc::kOk) << "write of page " << first + cookie;
    done += batch;
  }
}

// A server on a free loopback port with one memory node.
struct Node {
  explicit Node(size_t bytes = kNodeBytes) : server(loopback_tcp()) { server.export_node("node", bytes); }
  std::string uri() const { return loopback_uri(server, "node"); }
  MemoryServer server;
};

// Attaches as a writer, retrying while the lease is still held: a writer
// that just left is let go by the server a moment after its sockets close.
std::unique_ptr<Transport> attach_writer(const std::string& uri, bool io_uring = true) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  for (;;) {
    try {
      return connect_transport(uri, writer_options(io_uring));
    } catch (const Error& e) {
      if (e.code() != Errc::kLeased || std::chrono::steady_clock::now() > deadline) throw;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
}

class MemoryNodeIo : public ::testing::TestWithParam<bool> {};  // io_uring on or off

TEST_P(MemoryNodeIo, WritesMixedWithReadsReadBackByteForByteThroughAReader) {
  Node node;
  auto writer = connect_transport(node.uri(), writer_options(GetParam()));
  EXPECT_NE(writer->region().lease, 0u);
  auto ch = writer->open_channel();

  // Random pages, each written and then at once read back on the same
  // channel: many in flight, reads after writes in one stream.
  std::mt19937_64 rng(42);
  std::vector<size_t> order(kNodePages);
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  const size_t written = kNodePages * 3 / 4;  // the rest stay zero
  std::vector<std::byte> src(written * kPage);
  std::vector<std::byte> echo(written * kPage);
  constexpr size_t kBatch = 64;  // writes, each followed by its read: 128 in flight
  for (size_t at = 0; at < written; at += kBatch) {
    const size_t n = std::min(kBatch, written - at);
    std::vector<WriteOp> writes;
    std::vector<ReadOp> reads;
    for (size_t i = at; i < at + n; ++i) {
      fill_page(src.data() + i * kPage, order[i], 1);
      writes.push_back({order[i] * kPage, kPage, src.data() + i * kPage, 2 * i});
      reads.push_back({order[i] * kPage, kPage, echo.data() + i * kPage, 2 * i + 1});
    }
    // Interleave: write i, read i, write i+1, ...
    for (size_t i = 0; i < n; ++i) {
      ch->post_writes({&writes[i], 1});
      ch->post({&reads[i], 1});
    }
    const auto done = complete(*ch, 2 * n);
    ASSERT_EQ(done.size(), 2 * n);
    for (const auto& [cookie, status] : done) ASSERT_EQ(status, Errc::kOk) << "op " << cookie;
  }
  for (size_t i = 0; i < written; ++i) {
    ASSERT_TRUE(page_is(echo.data() + i * kPage, order[i], 1)) << "the read after the write of page " << order[i];
  }
  EXPECT_EQ(node.server.stats().writes_applied, written);
  EXPECT_EQ(node.server.stats().bytes_written, written * kPage);

  // A second transport, read-only, sees every byte.
  auto reader = connect_transport(node.uri(), reader_options());
  EXPECT_EQ(reader->region().lease, 0u);
  EXPECT_EQ(reader->region().identity, writer->region().identity);
  EXPECT_TRUE(reader->region().zero_map.empty()) << "a node's zero map would go stale as it is written";
  auto rch = reader->open_channel();
  const std::vector<std::byte> all = read_pages(*rch, 0, kNodePages);
  for (size_t i = 0; i < kNodePages; ++i) {
    const std::byte* p = all.data() + order[i] * kPage;
    if (i < written) {
      ASSERT_TRUE(page_is(p, order[i], 1)) << "page " << order[i];
    } else {
      ASSERT_TRUE(all_zero(p, kPage)) << "page " << order[i] << " was never written";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Io, MemoryNodeIo, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& i) { return i.param ? "IoUring" : "Syscalls"; });

TEST(MemoryNode, LargeWritesSpanManyRecvsAndLandWhole) {
  // Writes of the largest size allowed, several in flight at once.
  const size_t big = wire::kMaxReadBytes;
  Node large(4 * big);
  auto w = connect_transport(large.uri(), writer_options());
  auto wch = w->open_channel();
  std::vector<std::byte> src(4 * big);
  for (size_t p = 0; p < src.size() / kPage; ++p) fill_page(src.data() + p * kPage, p, 7);
  std::vector<WriteOp> ops;
  for (size_t i = 0; i < 4; ++i) ops.push_back({i * big, static_cast<uint32_t>(big), src.data() + i * big, i});
  wch->post_writes(ops);
  const auto done = complete(*wch, 4);
  ASSERT_EQ(done.size(), 4u);
  for (const auto& [cookie, status] : done) EXPECT_EQ(status, Errc::kOk) << cookie;
  auto reader = connect_transport(large.uri(), reader_options());
  auto rch = reader->open_channel();
  const std::vector<std::byte> back = read_pages(*rch, 0, src.size() / kPage);
  EXPECT_EQ(std::memcmp(back.data(), src.data(), src.size()), 0);
}

TEST(MemoryNode, ASecondWriterIsRefusedWhileReadersShare) {
  Node node;
  auto first = connect_transport(node.uri(), writer_options());
  auto ch = first->open_channel();
  std::vector<std::byte> src;
  write_pages(*ch, 0, 16, 1, src);

  std::string what;
  try {
    connect_transport(node.uri(), writer_options());
    ADD_FAILURE() << "a second writer was admitted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kLeased);
    what = e.what();
  }
  EXPECT_NE(what.find("another writer"), std::string::npos) << what;
  EXPECT_EQ(node.server.stats().writers_refused, 1u);

  // The first keeps working, on its first channel and on new ones (which
  // present its lease).
  write_pages(*ch, 16, 16, 1, src);
  auto bulk = first->open_channel(ChannelUse::kBulk);
  write_pages(*bulk, 32, 16, 1, src);

  // A reader shares the node with the writer and sees what it wrote; a
  // write on its channel is refused (it holds no lease).
  auto reader = connect_transport(node.uri(), reader_options());
  auto rch = reader->open_channel();
  const std::vector<std::byte> back = read_pages(*rch, 0, 48);
  for (size_t p = 0; p < 48; ++p) EXPECT_TRUE(page_is(back.data() + p * kPage, p, 1)) << "page " << p;
  std::vector<std::byte> page(kPage);
  const WriteOp op{0, kPage, page.data(), 99};
  rch->post_writes({&op, 1});
  const auto done = complete(*rch, 1);
  ASSERT_EQ(done.count(99), 1u);
  EXPECT_EQ(done.at(99), Errc::kLeased);
  // The writer goes on after all that.
  write_pages(*ch, 48, 1, 2, src);
  EXPECT_TRUE(page_is(read_pages(*rch, 48, 1).data(), 48, 2));
}

TEST(MemoryNode, WhatWasWrittenOutlivesTheWriterAndTheNextWriterSeesIt) {
  Node node;
  std::vector<std::byte> src;
  {
    auto first = connect_transport(node.uri(), writer_options());
    auto ch = first->open_channel();
    write_pages(*ch, 100, 200, 1, src);
  }
  // The lease went with the first writer's connections.
  auto second = attach_writer(node.uri());
  // The writer is told which pages were never written: those only.
  for (size_t p = 0; p < kNodePages; ++p) {
    ASSERT_EQ(is_zero_page(second->region().zero_map, p), p < 100 || p >= 300) << "page " << p;
  }
  auto ch = second->open_channel();
  const std::vector<std::byte> back = read_pages(*ch, 100, 200);
  for (size_t p = 0; p < 200; ++p) ASSERT_TRUE(page_is(back.data() + p * kPage, 100 + p, 1)) << "page " << 100 + p;
  write_pages(*ch, 100, 10, 2, src);
  EXPECT_TRUE(page_is(read_pages(*ch, 100, 1).data(), 100, 2));
  EXPECT_TRUE(page_is(read_pages(*ch, 110, 1).data(), 110, 1));
}

TEST(MemoryNode, AWriterReconnectsWithItsLeaseAfterADrop) {
  Node node;
  auto writer = connect_transport(node.uri(), writer_options());
  auto ch = writer->open_channel();
  std::vector<std::byte> src;
  write_pages(*ch, 0, 8, 1, src);
  node.server.drop_connections();
  // The next writes find the connection gone, reconnect presenting the
  // lease, and are sent again.
  write_pages(*ch, 8, 8, 1, src);
  EXPECT_GE(ch->reconnects(), 1u);
  auto reader = connect_transport(node.uri(), reader_options());
  auto rch = reader->open_channel();
  const std::vector<std::byte> back = read_pages(*rch, 0, 16);
  for (size_t p = 0; p < 16; ++p) EXPECT_TRUE(page_is(back.data() + p * kPage, p, 1)) << "page " << p;
}

TEST(MemoryNode, AWriterWhoseLeaseWasTakenWritesNothingMore) {
  Node node;
  auto writer = connect_transport(node.uri(), writer_options());
  auto ch = writer->open_channel();
  std::vector<std::byte> src;
  write_pages(*ch, 0, 4, 1, src);
  node.server.drop_connections();
  // While it is away, another destination takes the lease and writes.
  auto other = attach_writer(node.uri());
  auto och = other->open_channel();
  std::vector<std::byte> other_src;
  write_pages(*och, 0, 4, 2, other_src);
  // The first one's reconnect is refused: its writes fail, none lands.
  std::vector<std::byte> late(kPage);
  fill_page(late.data(), 0, 3);
  const WriteOp op{0, kPage, late.data(), 7};
  ch->post_writes({&op, 1});
  WaitResult w;
  Errc status = Errc::kOk;
  bool completed = false;
  std::string error;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!completed && std::chrono::steady_clock::now() < deadline) {
    w.clear();
    ch->wait(w, 100);
    for (const auto& c : w.completions) {
      if (c.cookie == 7) {
        completed = true;
        status = c.status;
      }
    }
    if (w.channel_error != Errc::kOk) error = w.channel_error_text;
  }
  ASSERT_TRUE(completed);
  EXPECT_NE(status, Errc::kOk);
  EXPECT_NE(error.find("another writer"), std::string::npos) << error;
  const std::vector<std::byte> back = read_pages(*och, 0, 1);
  EXPECT_TRUE(page_is(back.data(), 0, 2)) << "the refused writer's write landed";
}

TEST(MemoryNode, AWriterToARestartedServerFailsClearlyAndWritesNothing) {
  auto server = std::make_unique<MemoryServer>(loopback_tcp());
  server->export_node("node", kNodeBytes);
  const uint16_t port = server->port();
  const std::string uri = loopback_uri(*server, "node");
  auto writer = connect_transport(uri, writer_options());
  auto ch = writer->open_channel();
  std::vector<std::byte> src;
  write_pages(*ch, 0, 4, 1, src);
  server.reset();
  ServerOptions o = loopback_tcp();
  o.port = port;
  server = std::make_unique<MemoryServer>(o);
  server->export_node("node", kNodeBytes);  // another node: fresh and empty

  std::vector<std::byte> late(kPage);
  fill_page(late.data(), 0, 3);
  const WriteOp op{0, kPage, late.data(), 7};
  ch->post_writes({&op, 1});
  const auto done = complete(*ch, 1);
  ASSERT_EQ(done.count(7), 1u);
  EXPECT_NE(done.at(7), Errc::kOk);
  auto reader = connect_transport(uri, reader_options());
  auto rch = reader->open_channel();
  EXPECT_TRUE(all_zero(read_pages(*rch, 0, 4).data(), 4 * kPage)) << "a write went to the restarted server's node";
  EXPECT_EQ(server->stats().writes_applied, 0u);
}

// ---- The server's refusals, with raw sockets -----------------------------

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

// Attaches by hand, as a writer when flags has kHelloWriter (retrying while
// the lease is held by a connection the server is still closing). Returns
// the socket with the reply's status in *status.
UniqueFd raw_attach(uint16_t port, const std::string& name, uint8_t flags, Errc* status, uint32_t* key) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  for (;;) {
    UniqueFd fd = raw_connect(port);
    wire::HelloReply reply{};
    EXPECT_TRUE(testing::raw_hello(fd.get(), name, flags, &reply));
    *status = static_cast<Errc>(reply.status);
    *key = reply.key;
    if (*status == Errc::kLeased && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    if (*status != Errc::kOk) return fd;
    uint64_t identity = 0;
    uint64_t lease = 0;
    EXPECT_TRUE(tcp::recv_all(fd.get(), &identity, sizeof identity));
    if ((flags & wire::kHelloWriter) != 0) {
      EXPECT_TRUE(tcp::recv_all(fd.get(), &lease, sizeof lease));
      EXPECT_NE(lease, 0u);
    }
    std::vector<char> zero_map(reply.zero_map_bytes);
    EXPECT_TRUE(tcp::recv_all(fd.get(), zero_map.data(), zero_map.size()));
    return fd;
  }
}

// Sends a write header and `payload` bytes of `fill`.
bool send_write(int fd, uint32_t magic, uint32_t key, uint64_t offset, uint32_t length, size_t payload, uint8_t fill,
                uint32_t tag) {
  const wire::WriteRequest req{magic, key, offset, length, tag};
  std::vector<std::byte> bytes(payload, std::byte{fill});
  return tcp::send_all(fd, &req, sizeof req) && (payload == 0 || tcp::send_all(fd, bytes.data(), bytes.size()));
}

wire::ReadReply reply_of(int fd) {
  wire::ReadReply r{};
  EXPECT_TRUE(tcp::recv_all(fd, &r, sizeof r));
  return r;
}

// The node's bytes, read through a fresh reader.
std::vector<std::byte> node_bytes(const std::string& uri, size_t pages) {
  auto reader = connect_transport(uri, reader_options());
  auto ch = reader->open_channel();
  return read_pages(*ch, 0, pages);
}

template <typename Pred>
bool eventually(Pred pred, int limit_ms = 3000) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(limit_ms);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

TEST(MemoryNode, AWriteCutShortLeavesTheRegionAsItWas) {
  Node node(1 << 20);
  const uint16_t port = node.server.port();
  Errc status;
  uint32_t key = 0;
  UniqueFd fd = raw_attach(port, "node", wire::kHelloWriter, &status, &key);
  ASSERT_EQ(status, Errc::kOk);
  // A whole write of two pages of 0x11, answered...
  ASSERT_TRUE(send_write(fd.get(), wire::kWriteMagic, key, 0, 2 * kPage, 2 * kPage, 0x11, 1));
  wire::ReadReply r = reply_of(fd.get());
  EXPECT_EQ(r.magic, wire::kReplyMagic);
  EXPECT_EQ(static_cast<Errc>(r.status), Errc::kOk);
  EXPECT_EQ(r.tag, 1u);
  EXPECT_EQ(r.length, 0u);
  // ...then one of 0x22 over the same pages that stops after 5000 bytes.
  const uint64_t dropped = node.server.stats().connections_dropped;
  ASSERT_TRUE(send_write(fd.get(), wire::kWriteMagic, key, 0, 2 * kPage, 5000, 0x22, 2));
  fd.reset();
  ASSERT_TRUE(eventually([&] { return node.server.stats().connections_dropped > dropped; }));
  const std::vector<std::byte> back = node_bytes(node.uri(), 2);
  for (size_t i = 0; i < back.size(); ++i) {
    ASSERT_EQ(back[i], std::byte{0x11}) << "byte " << i << ": the cut write was applied in part";
  }
  EXPECT_EQ(node.server.stats().writes_applied, 1u);
}

TEST(MemoryNode, BadWritesAreRefusedTheConnectionDroppedAndOthersServed) {
  constexpr uint64_t kBytes = 2 * wire::kMaxReadBytes;  // room for a write over the size limit
  Node node(kBytes);
  const uint16_t port = node.server.port();
  // A reader that stays attached throughout: it must keep being served.
  auto reader = connect_transport(node.uri(), reader_options());
  auto rch = reader->open_channel();

  struct Case {
    const char* what;
    uint8_t flags;
    uint32_t magic;
    uint64_t offset;
    uint32_t length;
    size_t payload;
    Errc expect;
  };
  const Case cases[] = {
      {"bad magic", wire::kHelloWriter, 0x12345678, 0, kPage, kPage, Errc::kProtocol},
      {"past the end", wire::kHelloWriter, wire::kWriteMagic, kBytes - kPage, 2 * kPage, 2 * kPage, Errc::kOutOfBounds},
      {"offset past the end", wire::kHelloWriter, wire::kWriteMagic, kBytes, kPage, kPage, Errc::kOutOfBounds},
      {"empty", wire::kHelloWriter, wire::kWriteMagic, 0, 0, 0, Errc::kOutOfBounds},
      {"over the size limit", wire::kHelloWriter, wire::kWriteMagic, 0, wire::kMaxReadBytes + kPage, 0,
       Errc::kOutOfBounds},
      {"without the lease", 0, wire::kWriteMagic, 0, kPage, kPage, Errc::kLeased},
  };
  uint64_t refused = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    Errc status;
    uint32_t key = 0;
    UniqueFd fd = raw_attach(port, "node", c.flags, &status, &key);
    ASSERT_EQ(status, Errc::kOk);
    ASSERT_TRUE(send_write(fd.get(), c.magic, key, c.offset, c.length, c.payload, 0x33, 5));
    const wire::ReadReply r = reply_of(fd.get());
    EXPECT_EQ(static_cast<Errc>(r.status), c.expect);
    EXPECT_EQ(r.tag, 5u);
    EXPECT_EQ(r.length, 0u);
    EXPECT_TRUE(testing::closed_by_peer(fd.get()));
    if (c.magic == wire::kWriteMagic) ++refused;
    // The others are served all along.
    EXPECT_TRUE(all_zero(read_pages(*rch, 0, 2).data(), 2 * kPage));
  }
  EXPECT_EQ(node.server.stats().writes_refused, refused);
  EXPECT_EQ(node.server.stats().writes_applied, 0u);
  EXPECT_TRUE(all_zero(node_bytes(node.uri(), kBytes / kPage).data(), kBytes)) << "a refused write landed";
  // And a proper writer still gets the lease and writes.
  auto writer = attach_writer(node.uri());
  auto wch = writer->open_channel();
  std::vector<std::byte> src;
  write_pages(*wch, 0, 2, 1, src);
  EXPECT_TRUE(page_is(read_pages(*rch, 1, 1).data(), 1, 1));
}

TEST(MemoryNode, ReadOnlyExportsRefuseWriters) {
  auto server = std::make_unique<MemoryServer>(loopback_tcp());
  Mapping memory = Mapping::anonymous(1 << 20);
  std::memset(memory.data(), 0x5a, 1 << 20);
  server->export_memory("ro", memory.data(), 1 << 20);
  const std::string uri = loopback_uri(*server, "ro");

  // A transport opened for writing is refused with the reason.
  try {
    connect_transport(uri, writer_options());
    ADD_FAILURE() << "a writer was admitted to a read-only export";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kUnsupported);
    EXPECT_NE(std::string(e.what()).find("read-only"), std::string::npos) << e.what();
  }
  // A write on a reader's connection is refused and the connection dropped.
  Errc status;
  uint32_t key = 0;
  UniqueFd fd = raw_attach(server->port(), "ro", 0, &status, &key);
  ASSERT_EQ(status, Errc::kOk);
  ASSERT_TRUE(send_write(fd.get(), wire::kWriteMagic, key, 0, kPage, kPage, 0x00, 9));
  const wire::ReadReply r = reply_of(fd.get());
  EXPECT_EQ(static_cast<Errc>(r.status), Errc::kUnsupported);
  EXPECT_TRUE(testing::closed_by_peer(fd.get()));
  EXPECT_EQ(server->stats().writes_refused, 1u);
  for (size_t i = 0; i < (1u << 20); ++i) ASSERT_EQ(memory.data()[i], std::byte{0x5a}) << "byte " << i;
  // Readers are still served.
  const std::vector<std::byte> back = node_bytes(uri, 1);
  EXPECT_EQ(back[0], std::byte{0x5a});
}

TEST(MemoryNode, TransportsThatCannotWriteCompleteWritesUnsupported) {
  std::vector<std::byte> memory(16 * kPage);
  LocalTransport local(memory.data(), memory.size(), kPage);
  auto ch = local.open_channel();
  std::vector<std::byte> page(kPage, std::byte{1});
  const WriteOp op{0, kPage, page.data(), 3};
  ch->post_writes({&op, 1});
  const auto done = complete(*ch, 1, 1000);
  ASSERT_EQ(done.count(3), 1u);
  EXPECT_EQ(done.at(3), Errc::kUnsupported);
  EXPECT_EQ(memory[0], std::byte{0});
}

// ---- The command line -------------------------------------------------------

TEST(MemoryNode, CliServesMemoryNodes) {
  ChildServer child({"--rdma", "off", "--memory", "a=1M", "--memory", "b=64K"});
  const std::string base = "tcp://127.0.0.1:" + std::to_string(child.port()) + "/";
  auto writer = connect_transport(base + "a", writer_options());
  EXPECT_EQ(writer->region().length, 1u << 20);
  auto ch = writer->open_channel();
  std::vector<std::byte> src;
  write_pages(*ch, 0, 256, 1, src);
  const std::vector<std::byte> back = node_bytes(base + "a", 256);
  EXPECT_EQ(std::memcmp(back.data(), src.data(), src.size()), 0);
  auto b = connect_transport(base + "b", reader_options());
  EXPECT_EQ(b->region().length, 64u << 10);
}

TEST(MemoryNode, CliRefusesABadMemorySize) {
  const std::string cmd = std::string(PAGEWIRE_CLI) + " serve --port 0 --rdma off --memory a=abc 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, p) != nullptr) out += buf;
  const int st = ::pclose(p);
  ASSERT_TRUE(WIFEXITED(st)) << out;
  EXPECT_NE(WEXITSTATUS(st), 0) << out;
  EXPECT_NE(out.find("'abc' is not a size"), std::string::npos) << out;
  EXPECT_NE(out.find("--memory"), std::string::npos) << out;
}

}  // namespace
}  // namespace pagewire
