#include "transport/export_table.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <algorithm>
#include <random>

#include "pagewire/error.h"
#include "spdlog/spdlog.h"
#include "transport/uri.h"

namespace pagewire {
namespace {

void check_export(const std::string& name, uint32_t page_size) {
  if (const std::string problem = region_name_problem(name); !problem.empty()) {
    throw Error(Errc::kInvalidArgument, "cannot export '" + name + "': " + problem + " (no URI could name it)");
  }
  if (page_size < 4096 || (page_size & (page_size - 1)) != 0) {
    throw Error(Errc::kInvalidArgument, "page size must be a power of two of at least 4096");
  }
}

TrackingMode to_tracking_mode(WriteTracking t) {
  switch (t) {
    case WriteTracking::kAsync: return TrackingMode::kAsync;
    case WriteTracking::kSync: return TrackingMode::kSync;
    case WriteTracking::kAuto: break;
  }
  return TrackingMode::kAuto;
}

// One step of splitmix64: mixes v into h.
uint64_t mix(uint64_t h, uint64_t v) {
  uint64_t z = h + v + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t fresh_id() {
  uint64_t id = 0;
  while (id == 0) id = (uint64_t{std::random_device{}()} << 32) | std::random_device{}();
  return id;
}

}  // namespace

uint64_t WriterLease::admit_locked(uint64_t presented) {
  if (holders_ > 0) return presented != 0 && presented == lease_ ? lease_ : 0;
  if (presented == 0) {
    if (std::chrono::steady_clock::now() < reserved_until_) return 0;  // kept for the writer it was granted to
    lease_ = fresh_id();
    return lease_;
  }
  // Not this server's lease (it restarted), or another writer came since.
  return presented == lease_ ? lease_ : 0;
}

uint64_t WriterLease::acquire(uint64_t presented) {
  std::lock_guard lock(mu_);
  const uint64_t lease = admit_locked(presented);
  if (lease != 0) {
    ++holders_;
    reserved_until_ = {};
  }
  return lease;
}

uint64_t WriterLease::reserve(uint64_t presented, std::chrono::milliseconds hold) {
  std::lock_guard lock(mu_);
  const uint64_t lease = admit_locked(presented);
  // Even while held: the connections holding it now may all be gone by the
  // time the one this is for connects.
  if (lease != 0) reserved_until_ = std::chrono::steady_clock::now() + hold;
  return lease;
}

void WriterLease::release() {
  std::lock_guard lock(mu_);
  if (holders_ > 0) --holders_;
}

bool WriterLease::holds(uint64_t lease) const {
  std::lock_guard lock(mu_);
  return holders_ > 0 && lease != 0 && lease == lease_;
}

ZeroMap ExportedRegion::zero_map_snapshot() const {
  std::lock_guard lock(zero_map_mu);
  return zero_map;
}

ZeroMap ExportedRegion::unwritten_map() const {
  const size_t pages = (length + page_size - 1) / page_size;
  ZeroMap map((pages + 63) / 64, 0);
  for (size_t w = 0; w < map.size(); ++w) map[w] = ~written[w].load(std::memory_order_acquire);
  if (pages % 64 != 0) map.back() &= (uint64_t{1} << (pages % 64)) - 1;
  return map;
}

void ExportedRegion::mark_written(uint64_t offset, uint64_t n) const {
  if (!written || n == 0) return;
  for (uint64_t p = offset / page_size; p <= (offset + n - 1) / page_size; ++p) {
    written[p / 64].fetch_or(uint64_t{1} << (p % 64), std::memory_order_acq_rel);
  }
}

std::unique_ptr<ExportedRegion> ExportTable::from_file(const std::string& name, const std::string& path,
                                                       uint32_t page_size) {
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
  return region;
}

std::unique_ptr<ExportedRegion> ExportTable::from_memory(const std::string& name, const void* base, size_t length,
                                                         const ExportOptions& options) {
  const uint32_t page_size = options.page_size;
  uint64_t identity = options.identity;
  check_export(name, page_size);
  if (base == nullptr || length == 0) throw Error(Errc::kInvalidArgument, "export of empty memory");
  if (options.track_writes && identity != 0) {
    // Its write epochs start again at 0 with every instance: a destination
    // reconnecting to a restarted source must not take them for the old
    // ones, so a live export is always another region.
    throw Error(Errc::kInvalidArgument, "a live export (track_writes) draws its own identity: leave identity 0");
  }
  auto region = std::make_unique<ExportedRegion>();
  region->name = name;
  region->base = static_cast<const std::byte*>(base);
  region->length = length;
  region->page_size = page_size;
  region->identity = identity != 0 ? identity : fresh_id();
  region->zero_map = compute_zero_map(region->base, region->length, page_size);
  return region;
}

std::unique_ptr<ExportedRegion> ExportTable::node(const std::string& name, size_t length, uint32_t page_size) {
  check_export(name, page_size);
  if (length == 0) throw Error(Errc::kInvalidArgument, "memory node '" + name + "' of 0 bytes");
  auto region = std::make_unique<ExportedRegion>();
  region->name = name;
  region->node_memory = Mapping::anonymous(length);  // zeroed by the kernel
  region->writable_base = region->node_memory.data();
  region->base = region->writable_base;
  region->length = length;
  region->page_size = page_size;
  region->written = std::make_unique<std::atomic<uint64_t>[]>(((length + page_size - 1) / page_size + 63) / 64);
  // Fresh every time: a node restarted is empty, not the bytes a destination
  // wrote before.
  region->identity = fresh_id();
  return region;
}

void ExportTable::make_live(const ExportedRegion& added, const ExportOptions& options) {
  ExportedRegion* region = nullptr;
  {
    std::lock_guard lock(mu_);
    if (added.key >= regions_.size() || regions_[added.key].get() != &added) {
      throw Error(Errc::kNotFound, "'" + added.name + "' is not in this table");
    }
    region = regions_[added.key].get();
  }
  region->live = std::make_unique<LiveExport>(*region, to_tracking_mode(options.tracking), options.pause_writers,
                                              options.resume_writers);
  // Tracking first, then the map: a write while it is computed is reported
  // by the first harvest, which computes that page's bit again.
  std::lock_guard zero(region->zero_map_mu);
  update_zero_map(region->zero_map, region->base, region->length, region->page_size, 0,
                  (region->length + region->page_size - 1) / region->page_size);
}

void ExportTable::publish(const ExportedRegion& region) {
  std::lock_guard lock(mu_);
  if (by_name_.count(region.name) != 0) {
    throw Error(Errc::kInvalidArgument, "a region named '" + region.name + "' is exported already");
  }
  by_name_[region.name] = region.key;
}

const ExportedRegion& ExportTable::add(std::unique_ptr<ExportedRegion> region, bool findable) {
  std::lock_guard lock(mu_);
  if (by_name_.count(region->name) != 0) {
    throw Error(Errc::kInvalidArgument, "a region named '" + region->name + "' is exported already");
  }
  region->key = static_cast<uint32_t>(regions_.size());
  if (findable) by_name_[region->name] = region->key;
  regions_.push_back(std::move(region));
  const ExportedRegion& r = *regions_.back();
  spdlog::info("server: exporting '{}' ({} bytes, {} B pages{})", r.name, r.length, r.page_size,
               r.writable_base != nullptr ? ", a writable memory node" : "");
  return r;
}

void ExportTable::withdraw(const std::string& name) {
  std::lock_guard lock(mu_);
  by_name_.erase(name);
}

ExportedRegion* ExportTable::find_locked(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : regions_[it->second].get();
}

const ExportedRegion* ExportTable::find(const std::string& name) const {
  std::lock_guard lock(mu_);
  return find_locked(name);
}

void ExportTable::mark_changed(const std::string& name, uint64_t offset, uint64_t length) {
  ExportedRegion* r = nullptr;
  {
    std::lock_guard lock(mu_);
    r = find_locked(name);
  }
  if (r == nullptr) throw Error(Errc::kNotFound, "no region named '" + name + "' is exported");
  if (length == 0 || offset >= r->length || r->zero_map.empty()) return;
  const uint64_t end = offset + std::min(length, r->length - offset);  // no overflow
  std::lock_guard lock(r->zero_map_mu);
  update_zero_map(r->zero_map, r->base, r->length, r->page_size, offset / r->page_size,
                  (end + r->page_size - 1) / r->page_size);
}

}  // namespace pagewire
