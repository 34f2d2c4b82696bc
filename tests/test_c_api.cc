// The C API (pagewire/pagewire_c.h): the C11 example program run against a
// server, and the handler's per-connection entry point serving the
// stand-in VMM (tests/vmm_client.c).
#include "pagewire/pagewire_c.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <future>
#include <random>
#include <string>
#include <vector>

#include "common/unique_fd.h"
#include "tests/test_util.h"

extern char** environ;

namespace pagewire {
namespace {

struct Dir {
  Dir() {
    char tmpl[] = "/tmp/pagewire-capi-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~Dir() { std::system(("rm -rf '" + path + "'").c_str()); }
  std::string path;
};

std::string write_random_file(const std::string& path, size_t bytes) {
  std::vector<unsigned char> data(bytes);
  std::mt19937 rng(7);
  for (auto& b : data) b = static_cast<unsigned char>(rng() % 3 == 0 ? 0 : rng());
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  EXPECT_EQ(::write(fd.get(), data.data(), data.size()), static_cast<ssize_t>(data.size()));
  return path;
}

int run(std::vector<std::string> args) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  if (::posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), environ) != 0) return -1;
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

TEST(CApi, AC11ProgramAttachesVerifiesAndDetaches) {
  Dir dir;
  // Not a multiple of the page size: the last page is partly file.
  const std::string data = write_random_file(dir.path + "/data", (1u << 20) + 1000);
  MemoryServer server(testing::loopback_tcp());
  server.export_file("data", data);
  const int status = run({PAGEWIRE_C_CONSUMER, testing::loopback_uri(server, "data"), data});
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

TEST(CApi, BadArgumentsGetAStatusAndAReason) {
  pw_region* r = nullptr;
  EXPECT_EQ(pw_attach(nullptr, nullptr, &r), PW_INVALID_ARGUMENT);
  EXPECT_NE(std::string(pw_last_error()).find("uri"), std::string::npos);
  EXPECT_EQ(pw_attach("tcp://127.0.0.1:1/x", nullptr, nullptr), PW_INVALID_ARGUMENT);
  EXPECT_EQ(pw_attach("tcp://127.0.0.1:1/x", nullptr, &r), PW_CONNECT_FAILED);
  EXPECT_EQ(r, nullptr);
  EXPECT_STREQ(pw_status_name(PW_CONNECT_FAILED), "PW_CONNECT_FAILED");
  pw_server* s = nullptr;
  EXPECT_NE(pw_server_start("not an address", 0, &s), PW_OK);
  EXPECT_NE(std::string(pw_last_error()).find("not an address"), std::string::npos) << pw_last_error();
  EXPECT_EQ(s, nullptr);
  pw_stats st;
  EXPECT_EQ(pw_region_stats(nullptr, &st), PW_INVALID_ARGUMENT);
  pw_detach(nullptr);
  pw_server_stop(nullptr);
}

TEST(CApi, TheHandlersEntryPointServesOneConnection) {
  Dir dir;
  const std::string data = write_random_file(dir.path + "/guest", 4u << 20);
  MemoryServer server(testing::loopback_tcp());
  server.export_file("guest", data);
  const std::string path = dir.path + "/h.sock";
  UniqueFd listener(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  ASSERT_EQ(::bind(listener.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(listener.get(), 1), 0);
  const std::string uri = testing::loopback_uri(server, "guest");
  auto served = std::async(std::launch::async, [&] {
    const int conn = ::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC);
    pw_attach_options o;
    pw_attach_options_init(&o);
    o.handler_threads = 2;
    pw_handler_report report{};
    const pw_status st = pw_handler_serve_connection(conn, uri.c_str(), &o, -1, &report);
    return std::make_pair(st, report);
  });
  const int status = run({PAGEWIRE_VMM_CLIENT, "--socket", path, "--expect", data, "--threads", "3"});
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0);
  const auto [st, report] = served.get();
  EXPECT_EQ(st, PW_OK) << pw_last_error();
  EXPECT_EQ(report.served, 1);
  EXPECT_GT(report.pid, 0);
  EXPECT_GT(report.stats.faults, 0u);
}

}  // namespace
}  // namespace pagewire
