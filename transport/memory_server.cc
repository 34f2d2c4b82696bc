#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <algorithm>
#include <random>

#include "pagewire/error.h"
#include "pagewire/server.h"
#include "runtime/unique_fd.h"
#include "runtime/uri.h"
#include "spdlog/spdlog.h"
#if PAGEWIRE_HAVE_RDMA
#include "transport/rdma/rdma_server.h"
#endif
#include "transport/tcp/tcp_server.h"

namespace pagewire {
#if !PAGEWIRE_HAVE_RDMA
namespace rdma {
// A build without rdma-core: no device, and an RDMA server that refuses to
// be made, so that MemoryServer's pointer to one stays null (and RdmaServing
// kAuto serves TCP only, kOn fails with the reason).
namespace {
bool have_device() { return false; }
}  // namespace
class RdmaServer {
 public:
  template <typename... Args>
  explicit RdmaServer(Args&&...) {
    throw Error(Errc::kInvalidArgument, "RDMA serving was asked for (RdmaServing::kOn, serve --rdma on), but this "
                                        "pagewire is built without RDMA");
  }
  void add(const ExportedRegion&) {}
  uint64_t connections_accepted() const { return 0; }
  uint64_t connections_active() const { return 0; }
  void drop_connections() {}
  void stop() {}
};
}  // namespace rdma
#endif

namespace {

void check_export(const std::string& name, uint32_t page_size) {
  if (const std::string problem = region_name_problem(name); !problem.empty()) {
    throw Error(Errc::kInvalidArgument, "cannot export '" + name + "': " + problem + " (no URI could name it)");
  }
  if (page_size < 4096 || (page_size & (page_size - 1)) != 0) {
    throw Error(Errc::kInvalidArgument, "page size must be a power of two of at least 4096");
  }
}

// One step of splitmix64: mixes v into h.
uint64_t mix(uint64_t h, uint64_t v) {
  uint64_t z = h + v + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

MemoryServer::MemoryServer(const ServerOptions& options)
    : tcp_(std::make_unique<TcpServer>(options)), rdma_mode_(options.rdma) {
  if (options.rdma == RdmaServing::kOff) return;
  if (options.rdma == RdmaServing::kAuto && !rdma::have_device()) {
    spdlog::info("server: no RDMA device; serving TCP only");
    return;
  }
  try {
    rdma_ = std::make_unique<rdma::RdmaServer>(options.bind_address, tcp_->port(), options.max_connections);
  } catch (const std::exception& e) {
    if (options.rdma == RdmaServing::kOn) throw;
    spdlog::warn("server: not serving RDMA: {}", e.what());
  }
}

MemoryServer::~MemoryServer() { stop(); }

bool MemoryServer::serves_rdma() const { return rdma_ != nullptr; }

void MemoryServer::export_file(const std::string& name, const std::string& path, uint32_t page_size) {
  check_export(name, page_size);
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw_errno("open " + path);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw_errno("stat " + path);
  if (st.st_size <= 0) throw Error(Errc::kInvalidArgument, path + " is empty: nothing to export");
  const auto length = static_cast<size_t>(st.st_size);
  void* p = ::mmap(nullptr, length, PROT_READ, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) throw_errno("mmap " + path);
  auto region = std::make_unique<ExportedRegion>();
  region->name = name;
  region->file_mapping = Mapping(p, length);
  region->base = region->file_mapping.data();
  region->length = length;
  region->page_size = page_size;
  region->identity = mix(mix(mix(mix(mix(0, st.st_dev), st.st_ino), static_cast<uint64_t>(st.st_size)),
                             static_cast<uint64_t>(st.st_mtim.tv_sec)),
                         static_cast<uint64_t>(st.st_mtim.tv_nsec));
  region->zero_map = compute_zero_map(region->base, region->length, page_size);
  add(std::move(region));
}

void MemoryServer::export_memory(const std::string& name, const void* base, size_t length, uint32_t page_size,
                                 uint64_t identity) {
  check_export(name, page_size);
  if (base == nullptr || length == 0) throw Error(Errc::kInvalidArgument, "export of empty memory");
  auto region = std::make_unique<ExportedRegion>();
  region->name = name;
  region->base = static_cast<const std::byte*>(base);
  region->length = length;
  region->page_size = page_size;
  while (identity == 0) identity = (uint64_t{std::random_device{}()} << 32) | std::random_device{}();
  region->identity = identity;
  region->zero_map = compute_zero_map(region->base, region->length, page_size);
  add(std::move(region));
}

void MemoryServer::add(std::unique_ptr<ExportedRegion> region) {
  const ExportedRegion& r = tcp_->add(std::move(region));
  if (!rdma_) return;
  try {
    rdma_->add(r);
  } catch (const std::exception& e) {
    // Registering it with the device failed (a memlock limit, say).
    if (rdma_mode_ == RdmaServing::kOn) {
      tcp_->withdraw(r.name);
      throw;
    }
    spdlog::warn("server: '{}' is served over TCP only: {}", r.name, e.what());
  }
}

void MemoryServer::mark_changed(const std::string& name, uint64_t offset, uint64_t length) {
  ExportedRegion* r = tcp_->find_mutable(name);
  if (r == nullptr) throw Error(Errc::kNotFound, "no region named '" + name + "' is exported");
  if (length == 0 || offset >= r->length) return;
  const uint64_t end = offset + std::min(length, r->length - offset);  // no overflow
  std::lock_guard lock(r->zero_map_mu);
  update_zero_map(r->zero_map, r->base, r->length, r->page_size, offset / r->page_size,
                  (end + r->page_size - 1) / r->page_size);
}

uint16_t MemoryServer::port() const { return tcp_->port(); }
ServerStats MemoryServer::stats() const {
  ServerStats s = tcp_->stats();
  if (rdma_) {
    s.rdma_connections_accepted = rdma_->connections_accepted();
    s.rdma_connections_active = rdma_->connections_active();
  }
  return s;
}

void MemoryServer::drop_connections() {
  tcp_->drop_connections();
  if (rdma_) rdma_->drop_connections();
}

void MemoryServer::stop() {
  if (rdma_) rdma_->stop();
  tcp_->stop();
}

}  // namespace pagewire
