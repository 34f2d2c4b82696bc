#include "runtime/handshake.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "nlohmann/json.hpp"
#include "pagewire/error.h"
#include "spdlog/spdlog.h"

namespace pagewire {
namespace {

// Where user space ends on any Linux (57-bit addresses): a mapping past it
// is not a mapping.
constexpr uint64_t kUserSpaceEnd = uint64_t{1} << 57;

[[noreturn]] void bad(const std::string& what) { throw Error(Errc::kInvalidArgument, "handshake: " + what); }

uint64_t field(const nlohmann::json& m, size_t i, const char* name, bool required) {
  const auto it = m.find(name);
  if (it == m.end()) {
    if (required) bad("mapping " + std::to_string(i) + " has no \"" + name + "\"");
    return 0;
  }
  if (!it->is_number_unsigned()) {
    bad("mapping " + std::to_string(i) + ": \"" + name + "\" is not a non-negative integer: " + it->dump());
  }
  return it->get<uint64_t>();
}

GuestMapping parse_one(const nlohmann::json& m, size_t i) {
  if (!m.is_object()) bad("mapping " + std::to_string(i) + " is not an object: " + m.dump());
  GuestMapping g;
  g.base_host_virt_addr = field(m, i, "base_host_virt_addr", true);
  g.size = field(m, i, "size", true);
  g.offset = field(m, i, "offset", true);
  const bool has_size = m.contains("page_size");
  const bool has_kib = m.contains("page_size_kib");
  if (!has_size && !has_kib) bad("mapping " + std::to_string(i) + " has neither \"page_size\" nor \"page_size_kib\"");
  const uint64_t page = field(m, i, "page_size", false);
  // Deprecated, and despite its name in bytes.
  const uint64_t kib = field(m, i, "page_size_kib", false);
  if (has_size && has_kib && page != kib) {
    bad("mapping " + std::to_string(i) + ": \"page_size\" " + std::to_string(page) + " and \"page_size_kib\" " +
        std::to_string(kib) + " differ (both hold bytes)");
  }
  g.page_size = has_size ? page : kib;
  const std::string at = "mapping " + std::to_string(i) + " (" + std::to_string(g.size) + " bytes at " +
                         std::to_string(g.base_host_virt_addr) + ", source offset " + std::to_string(g.offset) + ")";
  if (g.page_size != 4096 && g.page_size != (2u << 20)) {
    bad(at + ": page size " + std::to_string(g.page_size) + " is not 4096 or 2097152");
  }
  if (g.size == 0) bad(at + " is empty");
  if (g.base_host_virt_addr % g.page_size != 0 || g.size % g.page_size != 0 || g.offset % g.page_size != 0) {
    bad(at + ": address, size and offset must be multiples of the page size " + std::to_string(g.page_size));
  }
  if (g.base_host_virt_addr >= kUserSpaceEnd || g.size > kUserSpaceEnd - g.base_host_virt_addr) {
    bad(at + " lies outside any process's address space");
  }
  if (g.offset > kUserSpaceEnd || g.size > kUserSpaceEnd - g.offset) bad(at + ": the source offset is absurd");
  return g;
}

}  // namespace

std::vector<GuestMapping> parse_guest_mappings(std::string_view text) {
  const nlohmann::json doc = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) bad("not JSON (" + std::to_string(text.size()) + " bytes)");
  if (!doc.is_array()) bad("not a JSON array of mappings");
  if (doc.empty()) bad("no mappings");
  std::vector<GuestMapping> out;
  out.reserve(doc.size());
  for (size_t i = 0; i < doc.size(); ++i) out.push_back(parse_one(doc[i], i));
  const uint64_t page = out[0].page_size;
  for (const GuestMapping& g : out) {
    if (g.page_size != page)
      bad("mappings of different page sizes (" + std::to_string(page) + " and " + std::to_string(g.page_size) + ")");
  }
  // Overlaps, in memory and in the source: sorted, each against the next.
  const auto check = [&](auto key, const char* where) {
    std::vector<GuestMapping> v = out;
    std::sort(v.begin(), v.end(), [&](const GuestMapping& a, const GuestMapping& b) { return key(a) < key(b); });
    for (size_t i = 1; i < v.size(); ++i) {
      if (key(v[i - 1]) + v[i - 1].size > key(v[i])) {
        bad(std::string("two mappings overlap ") + where + " (at " + std::to_string(key(v[i])) + ")");
      }
    }
  };
  check([](const GuestMapping& g) { return g.base_host_virt_addr; }, "in memory");
  check([](const GuestMapping& g) { return g.offset; }, "in the source");
  return out;
}

PeerCredentials peer_credentials(int conn) {
  ucred c{};
  socklen_t len = sizeof c;
  if (::getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &c, &len) != 0) throw_errno("getsockopt(SO_PEERCRED)");
  return {c.pid, c.uid, c.gid};
}

std::string receive_handshake(int conn, const HandlerOptions& options, HandshakeFds* out, int stop_fd) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(options.handshake_timeout_ms);
  std::string body;
  std::vector<char> buf(64 << 10);
  bool extra = false;
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
    pollfd fds[2] = {{conn, POLLIN, 0}, {stop_fd, POLLIN, 0}};
    const int ready = left > 0 ? ::poll(fds, stop_fd >= 0 ? 2 : 1, static_cast<int>(left)) : 0;
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) throw_errno("poll of the handler connection");
    if (stop_fd >= 0 && fds[1].revents != 0) throw Error(Errc::kCancelled, "handshake: the handler is stopping");
    if (ready == 0) {
      throw Error(Errc::kTimeout, "handshake: none within " + std::to_string(options.handshake_timeout_ms) + " ms (" +
                                      std::to_string(body.size()) + " bytes received)");
    }
    iovec iov{buf.data(), buf.size()};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 8)];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t n = ::recvmsg(conn, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) throw_errno("recvmsg of the handshake");
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd = -1;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        UniqueFd got(fd);
        if (!out->uffd) {
          out->uffd = std::move(got);
        } else if (!out->memfd) {
          out->memfd = std::move(got);
        } else {
          extra = true;  // closed, and the handshake refused once read
        }
      }
    }
    if (extra || (msg.msg_flags & MSG_CTRUNC) != 0) {
      bad("more descriptors than a handshake carries (a userfaultfd, and a memfd for shared memory)");
    }
    if (n == 0) {
      if (body.empty()) throw Error(Errc::kClosed, "handshake: the peer closed the connection before sending one");
      return body;  // parsed, and refused if incomplete, by the caller
    }
    body.append(buf.data(), static_cast<size_t>(n));
    if (body.size() > options.max_handshake_bytes) {
      bad("more than " + std::to_string(options.max_handshake_bytes) + " bytes and still not a whole JSON value");
    }
    if (nlohmann::json::accept(body)) return body;
  }
}

namespace {

// One mapping of /proc/PID/smaps: its range, whether it is shared, its file
// offset, device and inode, and its VmFlags.
struct Vma {
  uint64_t start = 0;
  uint64_t end = 0;
  bool shared = false;
  uint64_t offset = 0;
  dev_t dev = 0;
  uint64_t inode = 0;
  std::string flags{};
  uint64_t rss_kib = 0;  // mapped in its page tables now
};

bool parse_vma_line(const std::string& line, Vma* v) {
  unsigned long long start = 0, end = 0, offset = 0, inode = 0;
  unsigned major = 0, minor = 0;
  char perms[8] = {};
  if (std::sscanf(line.c_str(), "%llx-%llx %7s %llx %x:%x %llu", &start, &end, perms, &offset, &major, &minor,
                  &inode) != 7) {
    return false;
  }
  *v = Vma{start, end, perms[3] == 's', offset, makedev(major, minor), inode, {}};
  return true;
}

std::vector<Vma> read_smaps(pid_t pid, bool* readable) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/smaps");
  std::vector<Vma> out;
  std::string line;
  *readable = false;
  while (std::getline(in, line)) {
    *readable = true;
    Vma v;
    unsigned long long kib = 0;
    if (line.rfind("VmFlags:", 0) == 0) {
      if (!out.empty()) out.back().flags = " " + line.substr(8) + " ";
    } else if (std::sscanf(line.c_str(), "Rss: %llu kB", &kib) == 1 ||
               std::sscanf(line.c_str(), "Shared_Hugetlb: %llu kB", &kib) == 1 ||
               std::sscanf(line.c_str(), "Private_Hugetlb: %llu kB", &kib) == 1) {
      // hugetlb pages are counted apart from Rss.
      if (!out.empty()) out.back().rss_kib += kib;
    } else if (line.find(':') > line.find(' ') && parse_vma_line(line, &v)) {
      out.push_back(std::move(v));
    }
  }
  return out;
}

bool has_flag(const Vma& v, const char* flag) {
  return v.flags.find(std::string(" ") + flag + " ") != std::string::npos;
}

}  // namespace

void check_guest_memory(pid_t pid, const std::vector<GuestMapping>& mappings, int memfd) {
  bool readable = false;
  const std::vector<Vma> vmas = read_smaps(pid, &readable);
  if (!readable) {
    if (memfd >= 0) {
      bad("process " + std::to_string(pid) + "'s mappings cannot be read (/proc/" + std::to_string(pid) +
          "/smaps): shared memory is served only where the memfd is seen mapped where the mappings say");
    }
    spdlog::warn("handler: process {}'s mappings cannot be read (/proc/{}/smaps); served as the handshake says", pid,
                 pid);
    return;
  }
  struct stat st {};
  if (memfd >= 0 && ::fstat(memfd, &st) != 0) throw_errno("fstat of the memfd sent");
  for (size_t i = 0; i < mappings.size(); ++i) {
    const GuestMapping& g = mappings[i];
    const std::string at = "mapping " + std::to_string(i) + " (" + std::to_string(g.size) + " bytes at " +
                           std::to_string(g.base_host_virt_addr) + ")";
    // Covered from its start to its end by mappings of the process, each
    // as it must be.
    uint64_t next = g.base_host_virt_addr;
    const uint64_t end = g.base_host_virt_addr + g.size;
    for (const Vma& v : vmas) {
      if (v.end <= next || v.start > next) continue;
      if (memfd >= 0) {
        if (!v.shared || v.dev != st.st_dev || v.inode != st.st_ino) {
          bad(at + ": the process does not map the memfd sent there (shared)");
        }
        if (v.offset + (next - v.start) != g.offset + (next - g.base_host_virt_addr)) {
          bad(at + ": the process maps the memfd there at offset " + std::to_string(v.offset + (next - v.start)) +
              ", not at the mapping's offset " + std::to_string(g.offset + (next - g.base_host_virt_addr)));
        }
        // Minor faults for the pages in the memfd, missing faults for its
        // holes (a page punched out while its read was out: without them,
        // the kernel would give the process a zero page there unasked).
        if (!has_flag(v, "ui") || !has_flag(v, "um")) {
          bad(at + ": not registered for minor and missing faults (UFFDIO_REGISTER_MODE_MINOR | MODE_MISSING)");
        }
        // A page already in the process's page tables never faults: the
        // source's bytes would land under what it wrote there.
        if (v.rss_kib != 0) {
          bad(at + ": " + std::to_string(v.rss_kib) +
              " KiB of it are mapped in the process already; hand shared memory over before touching it");
        }
      } else {
        // Served by UFFDIO_COPY alone, a page already in its file (written
        // through another mapping) would be mapped by the kernel unasked.
        if (v.shared) {
          bad(at + " is shared memory (MAP_SHARED), which is served only with its memfd sent along and registered "
                   "for minor faults (anonymous shared memory, which has none, is not served)");
        }
        if (!has_flag(v, "um")) bad(at + ": not registered for missing faults (UFFDIO_REGISTER_MODE_MISSING)");
      }
      next = std::min(v.end, end);
      if (next == end) break;
    }
    if (next != end) bad(at + ": the process has nothing mapped at " + std::to_string(next));
  }
}

void check_userfaultfd(int fd) {
  char target[64] = {};
  const std::string link = "/proc/self/fd/" + std::to_string(fd);
  const ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
  if (n < 0 || std::string_view(target, static_cast<size_t>(n)) != "anon_inode:[userfaultfd]") {
    bad(std::string("the descriptor sent is not a userfaultfd (") + (n < 0 ? std::strerror(errno) : target) + ")");
  }
}

}  // namespace pagewire
