#include "tests/test_util.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <future>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>

#include "runtime/backing.h"
#include "tools/pattern.h"
#include "transport/protocol.h"
#include "transport/tcp/socket_util.h"

extern char** environ;

#ifdef PAGEWIRE_GUEST_SUITE
#include "transport/rdma/verbs.h"
#endif

namespace pagewire::testing {

ServerOptions loopback_tcp() {
  ServerOptions o;
  o.bind_address = "127.0.0.1";
  o.port = 0;
  o.rdma = RdmaServing::kOff;
  return o;
}

std::string loopback_uri(const MemoryServer& server, const std::string& name) {
  return "tcp://127.0.0.1:" + std::to_string(server.port()) + "/" + name;
}

namespace {

// Free huge pages no mapping has claimed yet: a mapping reserves its pages
// when it is made and takes them off the free count only as they are
// touched, so free pages can all be promised already (HugePages_Rsvd).
uint64_t unclaimed_huge_pages() {
  const HugePageCount have = huge_pages_2m();
  uint64_t claimed = 0;
  std::ifstream("/sys/kernel/mm/hugepages/hugepages-2048kB/resv_hugepages") >> claimed;
  return have.free > claimed ? have.free - claimed : 0;
}

}  // namespace

std::string guest_rdma_addr() {
#ifdef PAGEWIRE_GUEST_SUITE
  const char* addr = std::getenv("PAGEWIRE_RDMA_ADDR");
  if (addr != nullptr && *addr != '\0' && rdma::have_device()) return addr;
#endif
  return {};
}

std::string reserve_huge_pages(uint64_t pages) {
  uint64_t unclaimed = unclaimed_huge_pages();
  if (unclaimed >= pages) return "";
  {
    std::ofstream out("/proc/sys/vm/nr_hugepages");
    out << huge_pages_2m().total + (pages - unclaimed);
  }
  unclaimed = unclaimed_huge_pages();
  if (unclaimed >= pages) return "";
  return "needs " + std::to_string(pages) + " free 2 MiB huge pages, has " + std::to_string(unclaimed) +
         " not yet claimed by a mapping (reserving more needs root: sysctl vm.nr_hugepages)";
}

size_t verify_pages(const Region& r, const std::vector<size_t>& pages, int threads) {
  const size_t page = r.page_size();
  std::atomic<size_t> bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      for (size_t i = static_cast<size_t>(t); i < pages.size(); i += static_cast<size_t>(threads)) {
        const size_t p = pages[i];
        if (check_pattern(r.data() + p * page, p * page, page, kSeed) != -1) ++bad;
      }
    });
  }
  for (auto& t : ts) t.join();
  return bad.load();
}

size_t stampede(const Region& r, size_t page, int threads) {
  std::atomic<bool> go{false};
  std::atomic<size_t> bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      while (!go.load()) std::this_thread::yield();
      const size_t off = page * r.page_size() + static_cast<size_t>(t) * 128 % r.page_size();
      if (check_pattern(r.data() + off, off, 64, kSeed) != -1) ++bad;
    });
  }
  go.store(true);
  for (auto& t : ts) t.join();
  return bad.load();
}

Errc attach_error(const std::string& uri, std::string* what, unsigned reconnect_timeout_ms) {
  try {
    AttachOptions o = on_demand();
    o.reconnect_timeout_ms = reconnect_timeout_ms;
    attach(uri, o);
  } catch (const Error& e) {
    if (what != nullptr) *what = e.what();
    return e.code();
  }
  return Errc::kOk;
}

Walk walk_until_stopped(const Region& r, int threads) {
  const size_t page = r.page_size();
  Walk out;
  out.signals.resize(static_cast<size_t>(threads));
  std::atomic<size_t> wrong{0};
  std::atomic<size_t> good{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<uint64_t>(t) + 11);
      const size_t pages = r.size() / page;
      out.signals[static_cast<size_t>(t)] = run_catching_signals([&] {
        for (size_t i = 0; i < pages; ++i) {
          const size_t p = rng() % pages;
          if (check_pattern(r.data() + p * page, p * page, page, kSeed) != -1) {
            ++wrong;
          } else {
            ++good;
          }
        }
      });
    });
  }
  for (auto& t : ts) t.join();
  out.wrong = wrong.load();
  out.good = good.load();
  return out;
}

PatternServer::PatternServer(const std::string& name, size_t length, uint64_t seed)
    : PatternServer(name, length, seed, loopback_tcp()) {}

PatternServer::PatternServer(const std::string& name, size_t length, uint64_t seed, const ServerOptions& options)
    : name_(name), memory_(Mapping::anonymous(length)) {
  fill_pattern(memory_.data(), 0, length, seed);
  server_ = std::make_unique<MemoryServer>(options);
  server_->export_memory(name, memory_.data(), length);
}

std::string PatternServer::uri() const { return "tcp://127.0.0.1:" + std::to_string(server_->port()) + "/" + name_; }

ChildServer::ChildServer(const std::vector<std::string>& args, const std::string& bind, uint16_t port) {
  int fds[2];
  if (::pipe(fds) != 0) throw std::runtime_error("pipe");
  std::vector<std::string> argv_s = {PAGEWIRE_CLI, "serve", "--bind", bind};
  argv_s.insert(argv_s.end(), {"--port", std::to_string(port), "--ready-fd", "3"});
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& s : argv_s) argv.push_back(s.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  // Close the read end first: it may itself be descriptor 3.
  if (fds[0] != 3) posix_spawn_file_actions_addclose(&fa, fds[0]);
  posix_spawn_file_actions_adddup2(&fa, fds[1], 3);
  int rc = posix_spawn(&pid_, PAGEWIRE_CLI, &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(fds[1]);
  if (rc != 0) {
    ::close(fds[0]);
    throw std::runtime_error("spawn " PAGEWIRE_CLI);
  }
  char buf[16] = {};
  ssize_t n = ::read(fds[0], buf, sizeof buf - 1);
  ::close(fds[0]);
  if (n <= 0) throw std::runtime_error("the child server did not report its port");
  port_ = static_cast<uint16_t>(std::stoi(buf));
}

ChildServer::~ChildServer() { kill_now(); }

void restart_source(const std::vector<std::string>& serve_args, const std::vector<std::string>& successor_args,
                    const std::string& bind, const std::function<std::string(uint16_t)>& uri_of, AttachOptions o,
                    uint64_t kill_after_pages, const std::function<void(const Region&, const Walk&)>& check) {
  auto source = std::make_unique<ChildServer>(serve_args, bind);
  const uint16_t port = source->port();
  o.reconnect_timeout_ms = 20000;  // the new source takes a while to start
  Region r = attach(uri_of(port), o);
  auto w = std::async(std::launch::async, [&] { return walk_until_stopped(r, 2); });
  for (int i = 0; i < 10000 && r.stats().pages_fetched < kill_after_pages; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  source.reset();  // killed with reads in flight
  source = std::make_unique<ChildServer>(successor_args, bind, port);
  ASSERT_EQ(w.wait_for(std::chrono::seconds(300)), std::future_status::ready) << "a faulting thread hangs";
  check(r, w.get());
}

void expect_refused_as_another_region(const Region& r, const Walk& walk) {
  EXPECT_EQ(walk.wrong, 0u);
  EXPECT_TRUE(r.failed());
  EXPECT_NE(r.error().find("other bytes"), std::string::npos) << r.error();
  EXPECT_EQ(r.stats().reconnects, 0u);
  for (int sig : walk.signals) EXPECT_TRUE(sig == SIGBUS || sig == SIGSEGV) << "signal " << sig;
}

void expect_reconnected_losing_nothing(const Region& r, const Walk& walk) {
  EXPECT_EQ(walk.wrong, 0u);
  for (int sig : walk.signals) EXPECT_EQ(sig, 0) << "a thread was refused a page";
  // Every page arrives, byte for byte (the ones the walk left fetched last,
  // over a connection made again if the walk never needed one).
  int64_t bad = -2;
  EXPECT_EQ(run_catching_signals([&] { bad = check_pattern(r.data(), 0, r.size(), kSeed); }), 0);
  EXPECT_EQ(bad, -1);
  EXPECT_FALSE(r.failed()) << r.error();
  EXPECT_EQ(r.stats().pages_refused, 0u);
  EXPECT_GE(r.stats().reconnects, 1u);
}

void ChildServer::kill_now() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  int status;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

SilentServer::SilentServer(const std::string& name, uint64_t length) : name_(name), length_(length) {
  listen_fd_.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(listen_fd_.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(listen_fd_.get(), 16) != 0) {
    throw std::runtime_error("silent server: bind/listen");
  }
  socklen_t len = sizeof a;
  ::getsockname(listen_fd_.get(), reinterpret_cast<sockaddr*>(&a), &len);
  port_ = ntohs(a.sin_port);
  stop_fd_.reset(::eventfd(0, EFD_CLOEXEC));
  thread_ = std::make_unique<std::thread>([this] {
    for (;;) {
      pollfd p[2] = {{listen_fd_.get(), POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}};
      if (::poll(p, 2, -1) < 0 || p[1].revents != 0) return;
      int fd = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      accepted_.push_back(fd);
      wire::Hello hello{};
      if (::recv(fd, &hello, sizeof hello, MSG_WAITALL) != sizeof hello) continue;
      std::string n(hello.name_length, '\0');
      if (::recv(fd, n.data(), n.size(), MSG_WAITALL) != static_cast<ssize_t>(n.size())) continue;
      Nonce theirs{};
      Mac proof{};
      if (::recv(fd, theirs.data(), theirs.size(), MSG_WAITALL) != static_cast<ssize_t>(theirs.size())) continue;
      const wire::Challenge challenge{wire::kChallengeMagic, 0, {}, {}};
      ::send(fd, &challenge, sizeof challenge, MSG_NOSIGNAL);
      if (::recv(fd, proof.data(), proof.size(), MSG_WAITALL) != static_cast<ssize_t>(proof.size())) continue;
      wire::HelloReply reply{wire::kHelloMagic, 0, 7, 4096, length_, 0, 0};
      const uint64_t identity = 1;
      ::send(fd, &reply, sizeof reply, MSG_NOSIGNAL);
      ::send(fd, &identity, sizeof identity, MSG_NOSIGNAL);
    }
  });
}

bool raw_hello(int fd, const std::string& name, uint8_t flags, wire::HelloReply* reply, const AuthKey* key,
               uint64_t lease) {
  const wire::Hello h{wire::kHelloMagic, wire::kVersion, static_cast<uint8_t>(name.size()), flags};
  const Nonce mine = fresh_nonce();
  if (!tcp::send_all(fd, &h, sizeof h) || !tcp::send_all(fd, name.data(), name.size()) ||
      ((flags & wire::kHelloLease) != 0 && !tcp::send_all(fd, &lease, sizeof lease)) ||
      !tcp::send_all(fd, mine.data(), mine.size())) {
    return false;
  }
  wire::Challenge c{};
  if (!tcp::recv_all(fd, &c.magic, sizeof c.magic)) return false;
  if (c.magic == wire::kHelloMagic) {  // refused before the challenge
    reply->magic = c.magic;
    return tcp::recv_all(fd, reinterpret_cast<std::byte*>(reply) + sizeof c.magic, sizeof *reply - sizeof c.magic);
  }
  if (!tcp::recv_all(fd, reinterpret_cast<std::byte*>(&c) + sizeof c.magic, sizeof c - sizeof c.magic)) return false;
  Nonce theirs{};
  std::memcpy(theirs.data(), c.nonce, theirs.size());
  const Mac proof = key != nullptr ? wire::client_proof(*key, name, flags, lease, mine, theirs) : Mac{};
  return tcp::send_all(fd, proof.data(), proof.size()) && tcp::recv_all(fd, reply, sizeof *reply);
}

KeyFile::KeyFile(const std::string& contents, mode_t mode) {
  char dir[] = "/tmp/pagewire-key-XXXXXX";
  if (::mkdtemp(dir) == nullptr) throw std::runtime_error("mkdtemp");
  dir_ = dir;
  path_ = dir_ + "/key";
  std::ofstream(path_) << contents;
  ::chmod(path_.c_str(), mode);
}

KeyFile::~KeyFile() {
  ::unlink(path_.c_str());
  ::rmdir(dir_.c_str());
}

bool closed_by_peer(int fd) {
  char c;
  ssize_t n;
  do {
    n = ::recv(fd, &c, 1, 0);
  } while (n < 0 && errno == EINTR);
  return n == 0 || (n < 0 && errno == ECONNRESET);
}

SilentServer::~SilentServer() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t w = ::write(stop_fd_.get(), &one, sizeof one);
  thread_->join();
  for (int fd : accepted_) ::close(fd);
}

}  // namespace pagewire::testing
