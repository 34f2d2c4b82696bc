// Peers prove a shared key in the handshake (common/auth.h, protocol.h):
// a peer without it learns nothing of a keyed server's regions, a
// destination with a key trusts no server that cannot prove it back, and
// the secret itself never crosses the wire.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/test_util.h"
#include "tools/pattern.h"
#include "transport/protocol.h"
#include "transport/tcp/socket_util.h"
#include "transport/tickets.h"
#include "transport/transport.h"

namespace pagewire {
namespace {

using testing::kSeed;
using testing::loopback_tcp;
using testing::loopback_uri;
using testing::PatternServer;

constexpr const char* kSecret = "a shared secret of 32 bytes, ok!";
constexpr const char* kOtherSecret = "another secret, also long enough";

using testing::KeyFile;

ServerOptions keyed(const std::string& key_file) {
  ServerOptions o = loopback_tcp();
  o.key_file = key_file;
  return o;
}

AttachOptions with_key(const std::string& key_file) {
  AttachOptions o = testing::on_demand();
  o.key_file = key_file;
  o.reconnect_timeout_ms = 1000;
  return o;
}

Errc attach_error(const std::string& uri, const AttachOptions& o, std::string* what) {
  try {
    attach(uri, o);
  } catch (const Error& e) {
    *what = e.what();
    return e.code();
  }
  return Errc::kOk;
}

UniqueFd connect_loopback(uint16_t port) {
  std::string why;
  UniqueFd fd = tcp::connect_to(tcp::resolve("127.0.0.1", port), 2000, &why);
  EXPECT_TRUE(fd) << why;
  tcp::set_io_timeout(fd.get(), 5000);
  return fd;
}

TEST(Auth, KeyedServerServesADestinationWithTheKey) {
  KeyFile key(std::string(kSecret) + "\n");
  PatternServer src("k", 1 << 20, kSeed, keyed(key.path()));
  EXPECT_TRUE(src.server().keyed());
  AttachOptions o = with_key(key.path());
  o.background_pull = true;
  Region r = attach(src.uri(), o);
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(30))) << r.error();
  EXPECT_EQ(check_pattern(r.data(), 0, r.size(), kSeed), -1);
  EXPECT_EQ(src.server().stats().peers_refused_key, 0u);
}

TEST(Auth, PeerWithoutTheKeyLearnsNothing) {
  KeyFile key(kSecret);
  PatternServer src("k", 1 << 20, kSeed, keyed(key.path()));
  // Neither the region's descriptor nor whether a name exists.
  for (const std::string name : {"k", "no-such-region"}) {
    UniqueFd fd = connect_loopback(src.server().port());
    wire::HelloReply reply{};
    ASSERT_TRUE(testing::raw_hello(fd.get(), name, 0, &reply));
    EXPECT_EQ(static_cast<Errc>(reply.status), Errc::kAuth) << name;
    EXPECT_EQ(reply.key, 0u);
    EXPECT_EQ(reply.length, 0u);
    EXPECT_EQ(reply.page_size, 0u);
    EXPECT_EQ(reply.zero_map_bytes, 0u);
    EXPECT_TRUE(testing::closed_by_peer(fd.get()));
  }
  EXPECT_EQ(src.server().stats().peers_refused_key, 2u);
  EXPECT_EQ(src.server().stats().reads_served, 0u);
  // Through the library: a clear error that says what is missing.
  std::string what;
  EXPECT_EQ(attach_error(src.uri(), with_key(""), &what), Errc::kAuth);
  EXPECT_NE(what.find("asks for a key, and this destination has none"), std::string::npos) << what;
}

TEST(Auth, AnotherKeyIsRefusedBothWays) {
  KeyFile key(kSecret);
  KeyFile other(kOtherSecret);
  PatternServer src("k", 1 << 20, kSeed, keyed(key.path()));
  // The destination checks the server's proof first, and refuses it.
  std::string what;
  EXPECT_EQ(attach_error(src.uri(), with_key(other.path()), &what), Errc::kAuth);
  EXPECT_NE(what.find("does not hold this destination's key"), std::string::npos) << what;
  // A peer that answers anyway is refused by the server.
  const auto wrong = AuthKey::from_bytes(kOtherSecret);
  UniqueFd fd = connect_loopback(src.server().port());
  wire::HelloReply reply{};
  ASSERT_TRUE(testing::raw_hello(fd.get(), "k", 0, &reply, wrong.get()));
  EXPECT_EQ(static_cast<Errc>(reply.status), Errc::kAuth);
  EXPECT_EQ(reply.length, 0u);
  EXPECT_EQ(src.server().stats().peers_refused_key, 1u);
  // And the right key, by hand, is let in.
  const auto right = AuthKey::from_bytes(kSecret);
  UniqueFd ok = connect_loopback(src.server().port());
  ASSERT_TRUE(testing::raw_hello(ok.get(), "k", 0, &reply, right.get()));
  EXPECT_EQ(static_cast<Errc>(reply.status), Errc::kOk);
  EXPECT_EQ(reply.length, 1u << 20);
}

TEST(Auth, DestinationWithAKeyDistrustsAServerWithout) {
  KeyFile key(kSecret);
  PatternServer src("open", 1 << 20);
  EXPECT_FALSE(src.server().keyed());
  std::string what;
  EXPECT_EQ(attach_error(src.uri(), with_key(key.path()), &what), Errc::kAuth);
  EXPECT_NE(what.find("serves without a key"), std::string::npos) << what;
  // Without a key on either side, it is served as before.
  Region r = attach(src.uri(), testing::on_demand());
  EXPECT_EQ(check_pattern(r.data(), 0, 64 * 4096, kSeed), -1);
}

TEST(Auth, AnAnswerFromOneConnectionIsWorthNothingOnAnother) {
  KeyFile key(kSecret);
  PatternServer src("k", 1 << 20, kSeed, keyed(key.path()));
  const auto k = AuthKey::from_bytes(kSecret);
  const std::string name = "k";
  const Nonce mine = fresh_nonce();
  // Says hello with `mine` and answers with `answer`, or with the right
  // proof when answer is null; returns the server's status and its nonce.
  const auto hello = [&](const Mac* answer, Nonce* theirs) {
    UniqueFd fd = connect_loopback(src.server().port());
    const wire::Hello h{wire::kHelloMagic, wire::kVersion, static_cast<uint8_t>(name.size()), 0};
    EXPECT_TRUE(tcp::send_all(fd.get(), &h, sizeof h) && tcp::send_all(fd.get(), name.data(), name.size()) &&
                tcp::send_all(fd.get(), mine.data(), mine.size()));
    wire::Challenge c{};
    EXPECT_TRUE(tcp::recv_all(fd.get(), &c, sizeof c));
    EXPECT_EQ(c.magic, wire::kChallengeMagic);
    std::memcpy(theirs->data(), c.nonce, theirs->size());
    const Mac proof = answer != nullptr ? *answer : wire::client_proof(*k, name, 0, 0, mine, *theirs);
    EXPECT_TRUE(tcp::send_all(fd.get(), proof.data(), proof.size()));
    wire::HelloReply reply{};
    EXPECT_TRUE(tcp::recv_all(fd.get(), &reply, sizeof reply));
    return static_cast<Errc>(reply.status);
  };
  Nonce first{};
  ASSERT_EQ(hello(nullptr, &first), Errc::kOk);
  const Mac recorded = wire::client_proof(*k, name, 0, 0, mine, first);
  Nonce second{};
  EXPECT_EQ(hello(&recorded, &second), Errc::kAuth);
  EXPECT_NE(first, second);  // each connection gets a fresh nonce
}

TEST(Auth, TheSecretNeverCrossesTheWire) {
  // A server played by hand on one end of a socket pair records every
  // byte the destination sends through the whole handshake.
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd client(sv[0]);
  UniqueFd server(sv[1]);
  const auto k = AuthKey::from_bytes(kSecret);
  std::vector<uint8_t> received;
  Mac got{};
  Nonce theirs{};
  const Nonce mine = fresh_nonce();
  std::thread peer([&] {
    wire::Hello h{};
    tcp::recv_all(server.get(), &h, sizeof h);
    std::string name(h.name_length, '\0');
    tcp::recv_all(server.get(), name.data(), name.size());
    tcp::recv_all(server.get(), theirs.data(), theirs.size());
    wire::Challenge c{wire::kChallengeMagic, wire::kChallengeKeyed, {}, {}};
    std::memcpy(c.nonce, mine.data(), mine.size());
    const Mac proof = wire::server_proof(*k, name, h.flags, theirs, mine);
    std::memcpy(c.proof, proof.data(), proof.size());
    tcp::send_all(server.get(), &c, sizeof c);
    tcp::recv_all(server.get(), got.data(), got.size());
    const auto* p = reinterpret_cast<const uint8_t*>(&h);
    received.insert(received.end(), p, p + sizeof h);
    received.insert(received.end(), name.begin(), name.end());
    received.insert(received.end(), theirs.begin(), theirs.end());
    received.insert(received.end(), got.begin(), got.end());
    const wire::HelloReply no{wire::kHelloMagic, static_cast<uint32_t>(Errc::kNotFound), 0, 0, 0, 0, 0};
    tcp::send_all(server.get(), &no, sizeof no);
  });
  try {
    tcp::handshake(client.get(), "region", 5000, "the peer", 0, 0, k.get());
    ADD_FAILURE() << "the handshake took a kNotFound reply";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kNotFound) << e.what();
  }
  peer.join();
  // The destination proved the key over this connection's nonces...
  EXPECT_EQ(got, wire::client_proof(*k, "region", 0, 0, theirs, mine));
  // ...and no part of the secret went with it.
  const std::string secret = kSecret;
  const std::string sent(received.begin(), received.end());
  for (size_t i = 0; i + 8 <= secret.size(); ++i) {
    EXPECT_EQ(sent.find(secret.substr(i, 8)), std::string::npos) << "secret bytes at " << i;
  }
}

TEST(Auth, AServerThatSkipsTheChallengeIsNotTrusted) {
  // A peer that answers the hello with a descriptor straight away (as a
  // server of protocol 5 did, or one that has no key to prove) is never
  // read from, with a key or without.
  for (const bool with_key : {true, false}) {
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    UniqueFd client(sv[0]);
    UniqueFd server(sv[1]);
    std::thread peer([&] {
      std::vector<char> hello(sizeof(wire::Hello) + 6 + 32);
      tcp::recv_all(server.get(), hello.data(), hello.size());
      const wire::HelloReply ok{wire::kHelloMagic, static_cast<uint32_t>(Errc::kOk), 7, 4096, 1 << 20, 0, 0};
      const uint64_t identity = 1;
      tcp::send_all(server.get(), &ok, sizeof ok);
      tcp::send_all(server.get(), &identity, sizeof identity);
    });
    const auto k = AuthKey::from_bytes(kSecret);
    try {
      tcp::handshake(client.get(), "region", 5000, "the peer", 0, 0, with_key ? k.get() : nullptr);
      ADD_FAILURE() << "a descriptor sent without the challenge was taken";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), with_key ? Errc::kAuth : Errc::kProtocol) << e.what();
      EXPECT_NE(std::string(e.what()).find("without the challenge"), std::string::npos) << e.what();
    }
    peer.join();
  }
}

TEST(Auth, TicketsForRdmaAreGoodOnceForTheirRegionAndNotForLong) {
  TicketBook book(std::chrono::milliseconds(200));
  const uint64_t a = book.issue("a");
  const uint64_t b = book.issue("a");
  ASSERT_NE(a, 0u);
  EXPECT_NE(a, b);
  EXPECT_FALSE(book.redeem(a, "other"));  // another region's: refused, and used up
  EXPECT_FALSE(book.redeem(a, "a"));
  EXPECT_TRUE(book.redeem(b, "a"));
  EXPECT_FALSE(book.redeem(b, "a"));  // once
  EXPECT_FALSE(book.redeem(12345, "a"));
  const uint64_t c = book.issue("a");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_FALSE(book.redeem(c, "a"));  // expired
}

TEST(Auth, ATicketIsIssuedOnlyToAPeerThatProvedTheKey) {
  KeyFile key(kSecret);
  PatternServer src("k", 1 << 20, kSeed, keyed(key.path()));
  const auto k = AuthKey::load(key.path());
  UniqueFd fd = connect_loopback(src.server().port());
  const RegionDescriptor d = tcp::handshake(fd.get(), "k", 2000, "the server", wire::kHelloTicket, 0, k.get());
  EXPECT_NE(d.ticket, 0u);
  EXPECT_TRUE(d.zero_map.empty());  // a ticket connection carries no zero map
  EXPECT_TRUE(testing::closed_by_peer(fd.get()));
  // Never together with a lease or control (it would take and drop one).
  UniqueFd mixed = connect_loopback(src.server().port());
  wire::HelloReply refused{};
  ASSERT_TRUE(testing::raw_hello(mixed.get(), "k", wire::kHelloTicket | wire::kHelloControl, &refused, k.get()));
  EXPECT_EQ(static_cast<Errc>(refused.status), Errc::kInvalidArgument);
  // Without the key: refused like any other hello.
  UniqueFd bare = connect_loopback(src.server().port());
  wire::HelloReply reply{};
  ASSERT_TRUE(testing::raw_hello(bare.get(), "k", wire::kHelloTicket, &reply));
  EXPECT_EQ(static_cast<Errc>(reply.status), Errc::kAuth);
}

TEST(Auth, KeyFilesAreChecked) {
  const auto refused = [](const std::string& path) {
    try {
      AuthKey::load(path);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Errc::kInvalidArgument);
      return std::string(e.what());
    }
    return std::string("loaded");
  };
  EXPECT_NE(refused("/nonexistent/key").find("/nonexistent/key"), std::string::npos);
  KeyFile loose(kSecret, 0644);
  EXPECT_NE(refused(loose.path()).find("chmod 600"), std::string::npos) << refused(loose.path());
  KeyFile short_key("too short\n");
  EXPECT_NE(refused(short_key.path()).find("at least 16"), std::string::npos) << refused(short_key.path());
  KeyFile empty("");
  EXPECT_NE(refused(empty.path()).find("at least 16"), std::string::npos);
  // A server given a bad key file does not start.
  EXPECT_THROW(MemoryServer{keyed(loose.path())}, Error);
  // Trailing whitespace is not part of the key.
  KeyFile with_newline(std::string(kSecret) + " \n");
  const auto a = AuthKey::load(with_newline.path());
  const auto b = AuthKey::from_bytes(kSecret);
  EXPECT_EQ(a->mac("x", {}), b->mac("x", {}));
  EXPECT_NE(b->mac("x", {}), AuthKey::from_bytes(kOtherSecret)->mac("x", {}));
  EXPECT_THROW(AuthKey::from_bytes("short"), Error);
}

TEST(Auth, KeyFromTheEnvironment) {
  KeyFile key(kSecret);
  struct Env {
    explicit Env(const std::string& v) { ::setenv("PAGEWIRE_KEY_FILE", v.c_str(), 1); }
    ~Env() { ::unsetenv("PAGEWIRE_KEY_FILE"); }
  } env(key.path());
  PatternServer src("k", 1 << 20, kSeed, loopback_tcp());
  EXPECT_TRUE(src.server().keyed());
  Region r = attach(src.uri(), testing::on_demand());  // the destination finds it too
  EXPECT_EQ(check_pattern(r.data(), 0, 64 * 4096, kSeed), -1);
  // An option names the file over the environment.
  KeyFile other(kOtherSecret);
  std::string what;
  EXPECT_EQ(attach_error(src.uri(), with_key(other.path()), &what), Errc::kAuth) << what;
}

TEST(Auth, ReconnectsWritersAndControlProveTheKeyToo) {
  KeyFile key(kSecret);
  // Reconnects after the server dropped every connection.
  {
    PatternServer src("k", 1 << 20, kSeed, keyed(key.path()));
    Region r = attach(src.uri(), with_key(key.path()));
    ASSERT_EQ(check_pattern(r.data(), 0, 32 * 4096, kSeed), -1);
    src.server().drop_connections();
    EXPECT_EQ(check_pattern(r.data(), 0, r.size(), kSeed), -1);
    EXPECT_GE(r.stats().reconnects, 1u);
    EXPECT_FALSE(r.failed()) << r.error();
  }
  // A memory node's writer, and a reader that reads back what it wrote.
  MemoryServer node(keyed(key.path()));
  node.export_node("node", 1 << 20);
  TransportOptions t;
  t.writer = true;
  t.key = AuthKey::load(key.path());
  auto writer = connect_transport(loopback_uri(node, "node"), t);
  auto ch = writer->open_channel(ChannelUse::kDemand);
  std::vector<std::byte> page(4096, std::byte{0x5a});
  const WriteOp op{4096, 4096, page.data(), 7};
  ch->post_writes({&op, 1});
  WaitResult w;
  for (int i = 0; i < 100 && w.completions.empty(); ++i) ch->wait(w, 100);
  ASSERT_EQ(w.completions.size(), 1u);
  EXPECT_EQ(w.completions[0].status, Errc::kOk);
  EXPECT_EQ(node.stats().writes_applied, 1u);
  // A control connection (here: asked of a region that is not live, and
  // refused as such, which it can only be once it proved the key).
  auto control = writer->open_control();
  try {
    control->written_since(0);
    ADD_FAILURE() << "a memory node answered as a live export";
  } catch (const Error& e) {
    EXPECT_NE(e.code(), Errc::kAuth) << e.what();
  }
  // Without the key, no writer.
  t.key = nullptr;
  std::string what;
  try {
    connect_transport(loopback_uri(node, "node"), t);
    ADD_FAILURE() << "a writer without the key was let in";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kAuth) << e.what();
  }
  EXPECT_EQ(node.stats().writes_applied, 1u);
}

// A TCP connection to the server from another loopback address than the
// destinations' (127.0.0.1): an attacker's host, for the per-peer limits.
UniqueFd connect_from(const char* source, uint16_t port) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in local{};
  local.sin_family = AF_INET;
  ::inet_pton(AF_INET, source, &local.sin_addr);
  EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&local), sizeof local), 0) << std::strerror(errno);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(port);
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&to), sizeof to), 0) << std::strerror(errno);
  tcp::set_io_timeout(fd.get(), 5000);
  return fd;
}

TEST(ServerLimits, IdleSocketsDoNotKeepAKeyedDestinationOut) {
  KeyFile key(kSecret);
  ServerOptions o = keyed(key.path());
  o.handshake_timeout_ms = 2000;
  PatternServer src("k", 1 << 20, kSeed, o);
  // 300 sockets that connect and say nothing, and a few that say hello and
  // then never answer the challenge, all from one other host.
  std::vector<UniqueFd> idle;
  for (int i = 0; i < 300; ++i) idle.push_back(connect_from("127.0.0.2", src.server().port()));
  for (int i = 0; i < 4; ++i) {
    UniqueFd fd = connect_from("127.0.0.2", src.server().port());
    const wire::Hello h{wire::kHelloMagic, wire::kVersion, 1, 0};
    tcp::send_all(fd.get(), &h, sizeof h);
    tcp::send_all(fd.get(), "k", 1);
    idle.push_back(std::move(fd));
  }
  // The destination, from its own address, attaches and reads every byte,
  // while they still hold their sockets.
  AttachOptions a = with_key(key.path());
  a.background_pull = true;
  Region r = attach(src.uri(), a);
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(30))) << r.error();
  EXPECT_EQ(check_pattern(r.data(), 0, r.size(), kSeed), -1);
  const ServerStats s = src.server().stats();
  // All but max_handshakes_per_peer of them were refused at once...
  EXPECT_GE(s.connections_refused, 304u - o.max_handshakes_per_peer);
  // ...and those let into a handshake are dropped at its deadline.
  for (int i = 0; i < 300 && src.server().stats().connections_dropped < o.max_handshakes_per_peer; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_GE(src.server().stats().connections_dropped, o.max_handshakes_per_peer);
  EXPECT_EQ(s.peers_refused_key, 0u);  // none got as far as a proof
}

TEST(ServerLimits, AHandshakeSentAByteAtATimeMeetsItsDeadline) {
  ServerOptions o = loopback_tcp();
  o.handshake_timeout_ms = 500;
  PatternServer src("k", 1 << 20, kSeed, o);
  UniqueFd fd = connect_loopback(src.server().port());
  const wire::Hello h{wire::kHelloMagic, wire::kVersion, 200, 0};
  const auto* p = reinterpret_cast<const char*>(&h);
  // Each byte well within any per-read timeout; all of them far past the
  // deadline.
  const auto start = std::chrono::steady_clock::now();
  bool cut = false;
  for (size_t i = 0; i < sizeof h + 200 && !cut; ++i) {
    const char byte = i < sizeof h ? p[i] : 'x';
    cut = ::send(fd.get(), &byte, 1, MSG_NOSIGNAL) != 1;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(3)) break;
  }
  EXPECT_TRUE(testing::closed_by_peer(fd.get()));
  // Cut at the deadline (500 ms), not after the last byte plus a read
  // timeout.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(2500));
  EXPECT_GE(src.server().stats().connections_dropped, 1u);
}

TEST(ServerLimits, OneAddressCannotTakeEveryConnection) {
  ServerOptions o = loopback_tcp();
  o.max_connections_per_peer = 4;
  PatternServer src("k", 1 << 20, kSeed, o);
  std::vector<UniqueFd> held;
  for (int i = 0; i < 4; ++i) {
    held.push_back(connect_from("127.0.0.2", src.server().port()));
    wire::HelloReply reply{};
    ASSERT_TRUE(testing::raw_hello(held.back().get(), "k", 0, &reply));
    EXPECT_EQ(static_cast<Errc>(reply.status), Errc::kOk);
  }
  UniqueFd fifth = connect_from("127.0.0.2", src.server().port());
  wire::HelloReply reply{};
  ASSERT_TRUE(testing::raw_hello(fifth.get(), "k", 0, &reply));
  EXPECT_EQ(static_cast<Errc>(reply.status), Errc::kBusy);
  EXPECT_EQ(src.server().stats().connections_refused, 1u);
  // Another address still gets in, and one of the four going frees a place.
  Region r = attach(src.uri(), testing::on_demand(2));
  EXPECT_EQ(check_pattern(r.data(), 0, 64 * 4096, kSeed), -1);
  held.pop_back();
  for (int i = 0; i < 100; ++i) {
    UniqueFd again = connect_from("127.0.0.2", src.server().port());
    ASSERT_TRUE(testing::raw_hello(again.get(), "k", 0, &reply));
    if (static_cast<Errc>(reply.status) == Errc::kOk) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // the server may not have seen the close yet
  }
  EXPECT_EQ(static_cast<Errc>(reply.status), Errc::kOk);
}

TEST(ServerLimits, IdleConnectionsAreClosedAndDestinationsComeBack) {
  ServerOptions o = loopback_tcp();
  o.idle_timeout_ms = 300;
  PatternServer src("k", 1 << 20, kSeed, o);
  UniqueFd fd = connect_loopback(src.server().port());
  wire::HelloReply reply{};
  ASSERT_TRUE(testing::raw_hello(fd.get(), "k", 0, &reply));
  ASSERT_EQ(static_cast<Errc>(reply.status), Errc::kOk);
  uint64_t identity = 0;
  ASSERT_TRUE(tcp::recv_all(fd.get(), &identity, sizeof identity));
  std::vector<char> zero_map(reply.zero_map_bytes);
  ASSERT_TRUE(tcp::recv_all(fd.get(), zero_map.data(), zero_map.size()));
  EXPECT_TRUE(testing::closed_by_peer(fd.get()));  // within the 5 s receive timeout, once idle 300 ms
  EXPECT_GE(src.server().stats().connections_idle_closed, 1u);
  // A region whose connections were closed while idle reconnects and goes on.
  AttachOptions a = testing::on_demand(2);
  a.reconnect_timeout_ms = 2000;
  Region r = attach(src.uri(), a);
  ASSERT_EQ(check_pattern(r.data(), 0, 64 * 4096, kSeed), -1);
  std::this_thread::sleep_for(std::chrono::milliseconds(800));
  EXPECT_EQ(check_pattern(r.data(), 0, r.size(), kSeed), -1);
  EXPECT_FALSE(r.failed()) << r.error();
  EXPECT_GE(r.stats().reconnects, 1u);
}

TEST(ServerLimits, AnIdleWriterKeepsItsLease) {
  // Closing every connection of an idle writer would free its lease for
  // another destination: a writer's connections are never closed as idle.
  ServerOptions o = loopback_tcp();
  o.idle_timeout_ms = 200;
  MemoryServer node(o);
  node.export_node("node", 1 << 20);
  TransportOptions t;
  t.writer = true;
  t.reconnect_timeout_ms = 1000;
  auto writer = connect_transport(loopback_uri(node, "node"), t);
  auto ch = writer->open_channel(ChannelUse::kDemand);
  std::vector<std::byte> page(4096, std::byte{0x33});
  const auto write_once = [&](uint64_t cookie) {
    const WriteOp op{0, 4096, page.data(), cookie};
    ch->post_writes({&op, 1});
    WaitResult w;
    for (int i = 0; i < 100 && w.completions.empty(); ++i) ch->wait(w, 100);
    return w.completions.empty() ? Errc::kTimeout : w.completions[0].status;
  };
  ASSERT_EQ(write_once(1), Errc::kOk);
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  try {
    connect_transport(loopback_uri(node, "node"), t);
    ADD_FAILURE() << "a second writer took the lease of an idle one";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kLeased) << e.what();
  }
  EXPECT_EQ(write_once(2), Errc::kOk);
  EXPECT_EQ(writer->open_channel(ChannelUse::kBulk) != nullptr, true);
  EXPECT_EQ(node.stats().writes_applied, 2u);
}

// Runs the command line; returns its exit status and, in *out, what it
// printed (stdout and stderr).
int run_cli(const std::string& args, std::string* out) {
  FILE* p = ::popen((std::string(PAGEWIRE_CLI) + " " + args + " 2>&1").c_str(), "r");
  if (p == nullptr) return -1;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, p) != nullptr) *out += buf;
  const int st = ::pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

TEST(Auth, CommandLineKeygenServeAndAttach) {
  char dir[] = "/tmp/pagewire-keygen-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  const std::string path = std::string(dir) + "/key";
  std::string out;
  ASSERT_EQ(run_cli("keygen " + path, &out), 0) << out;
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  // Never over a file that exists: it may be the key every peer holds.
  const auto before = AuthKey::load(path)->mac("x", {});
  out.clear();
  EXPECT_NE(run_cli("keygen " + path, &out), 0);
  EXPECT_NE(out.find("exists"), std::string::npos) << out;
  EXPECT_EQ(AuthKey::load(path)->mac("x", {}), before);
  {
    testing::ChildServer serve({"--rdma", "off", "--pattern", "p=4M", "--key-file", path});
    const std::string uri = "tcp://127.0.0.1:" + std::to_string(serve.port()) + "/p";
    out.clear();
    EXPECT_EQ(run_cli("attach " + uri + " --key-file " + path + " --verify --pull", &out), 0) << out;
    EXPECT_NE(out.find("verified: every byte"), std::string::npos) << out;
    out.clear();
    EXPECT_NE(run_cli("attach " + uri, &out), 0);
    EXPECT_NE(out.find("asks for a key"), std::string::npos) << out;
  }
  ::unlink(path.c_str());
  ::rmdir(dir);
}

}  // namespace
}  // namespace pagewire
