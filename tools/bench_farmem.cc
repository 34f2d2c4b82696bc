// `pagewire bench --suite farmem`: far memory. A memory node in this
// process holds the region (every page given content first); destinations
// attach it with a bounded cache (25%, 50%, 100% of it), and two threads
// touch pages uniformly at random or with Zipf (0.99) skew, reading only or
// writing half of the touches, under CLOCK and FIFO eviction. Each run ends
// with a flush, and a second destination attaches the node and checks every
// page against the generation last written to it. For reference, in the
// same run: the same access with no cache limit (every page faulted once).
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/swap.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "nlohmann/json.hpp"
#include "pagewire/pagewire.h"
#include "runtime/metrics.h"
#include "tools/bench.h"
#include "tools/cli_util.h"
#include "tools/pattern.h"
#include "transport/transport.h"

namespace pagewire::cli {
namespace {

constexpr size_t kPage = 4096;
constexpr unsigned kThreads = 2;

// A page's bytes for a generation (tools/pattern.h): they name the page
// and the generation.
void fill(std::byte* p, uint64_t page, uint32_t generation) { fill_generation(p, page * kPage, kPage, generation); }

bool holds(const std::byte* p, uint64_t page, uint32_t generation) {
  return holds_generation(p, page * kPage, kPage, generation);
}

enum class Access { kUniform, kZipf };
const char* name(Access a) { return a == Access::kUniform ? "uniform" : "zipf"; }

// Draws pages: uniform, or Zipf(0.99) over ranks scattered across the
// region by a fixed permutation (hot pages are not neighbours).
class Sampler {
 public:
  Sampler(size_t pages, Access a) : access_(a), pages_(pages) {
    if (a == Access::kUniform) return;
    cdf_.resize(pages);
    double sum = 0;
    for (size_t i = 0; i < pages; ++i) cdf_[i] = sum += 1.0 / std::pow(static_cast<double>(i + 1), 0.99);
    for (double& v : cdf_) v /= sum;
    rank_to_page_.resize(pages);
    for (size_t i = 0; i < pages; ++i) rank_to_page_[i] = static_cast<uint32_t>(i);
    std::shuffle(rank_to_page_.begin(), rank_to_page_.end(), std::mt19937_64(7));
  }
  size_t draw(std::mt19937_64& rng) const {
    if (access_ == Access::kUniform) return rng() % pages_;
    const double u = std::uniform_real_distribution<double>(0, 1)(rng);
    const size_t rank = static_cast<size_t>(std::lower_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin());
    return rank_to_page_[std::min(rank, pages_ - 1)];
  }

 private:
  Access access_;
  size_t pages_;
  std::vector<double> cdf_;
  std::vector<uint32_t> rank_to_page_;
};

struct RunSpec {
  double cache_share = 0;  // 0: no limit (the reference)
  Access access = Access::kUniform;
  double write_share = 0;
  AttachOptions::Eviction policy = AttachOptions::Eviction::kClock;
};

struct RunResult {
  RunSpec spec;
  double touches_per_second = 0;
  uint64_t touches = 0;
  LatencySummary faults;
  uint64_t pages_evicted = 0;
  uint64_t bytes_written_back = 0;
  uint64_t max_resident_bytes = 0;
  uint64_t cache_bytes = 0;
  uint64_t wrong_pages = 0;
  uint64_t unsaved_pages = 0;
};

// What the touching threads keep about each page: the generation last
// written, and a lock so that one thread writes a page at a time.
struct Pages {
  explicit Pages(size_t n) : count(n), generation(n), locks(n) {}
  size_t count;
  std::vector<std::atomic<uint32_t>> generation;
  std::vector<std::atomic<bool>> locks;
};

struct Farm {
  Farm(uint64_t size, const std::string& addr)
      : server(ServerOptions{.bind_address = addr, .port = 0}), pages(size / kPage) {
    server.export_node("farmem", size);
    uri = "tcp://" + addr + ":" + std::to_string(server.port()) + "/farmem";
  }
  MemoryServer server;
  std::string uri;
  Pages pages;
};

// Generation 1 of every page, written straight to the node.
void fill_node(Farm& f) {
  TransportOptions t;
  t.writer = true;
  auto tr = connect_transport(f.uri, t);
  auto ch = tr->open_channel();
  constexpr size_t kBatch = 32;
  Mapping buf = Mapping::anonymous(kBatch * kPage);
  ch->register_buffer(buf.data(), buf.size());
  WaitResult w;
  for (size_t first = 0; first < f.pages.count; first += kBatch) {
    const size_t n = std::min(kBatch, f.pages.count - first);
    std::vector<WriteOp> ops;
    for (size_t i = 0; i < n; ++i) {
      fill(buf.data() + i * kPage, first + i, 1);
      ops.push_back({(first + i) * kPage, static_cast<uint32_t>(kPage), buf.data() + i * kPage, i});
    }
    ch->post_writes(ops);
    for (size_t done = 0; done < n;) {
      w.clear();
      ch->wait(w, 1000);
      for (const auto& c : w.completions) {
        if (c.status != Errc::kOk) throw Error(c.status, "filling the memory node: " + w.channel_error_text);
        ++done;
      }
      if (w.channel_error != Errc::kOk) throw Error(w.channel_error, w.channel_error_text);
    }
  }
  for (auto& g : f.pages.generation) g.store(1);
}

// A touch that took this long faulted (a resident page takes well under a
// microsecond, a fault tens of them).
constexpr uint64_t kFaultNs = 5000;

struct Touches {
  uint64_t count = 0;
  std::vector<uint64_t> fault_ns;  // the touches that faulted, as the touching threads saw them
};

// Warm-up: the threads sweep the region in order (prefetch fills the cache
// quickly) until `warm_pages` are resident. Then `seconds` of touches drawn
// by `s`, each timed at its first access (a one-byte read, or a one-byte
// write before the rest of the page is written).
Touches touch(Pages& f, std::byte* base, const std::function<uint64_t()>& resident, const Sampler& s,
              const RunSpec& spec, bool bump, uint64_t warm_pages, double seconds) {
  std::atomic<int> phase{warm_pages > 0 ? 0 : 1};  // 0 warm-up, 1 measured, 2 stop
  std::vector<Touches> mine(kThreads);
  auto worker = [&](unsigned t) {
    for (size_t p = t * (f.count / kThreads); p < f.count && phase.load(std::memory_order_relaxed) == 0; ++p) {
      (void)*reinterpret_cast<volatile const std::byte*>(base + p * kPage);
    }
    while (phase.load() == 0) std::this_thread::yield();
    std::mt19937_64 rng(0x5eed + t * 7919);
    std::uniform_real_distribution<double> coin(0, 1);
    Touches& out = mine[t];
    out.fault_ns.reserve(1 << 16);
    while (phase.load(std::memory_order_relaxed) == 1) {
      for (int k = 0; k < 16; ++k) {
        const size_t p = s.draw(rng);
        std::byte* a = base + p * kPage;
        uint64_t took = 0;
        if (coin(rng) < spec.write_share) {
          while (f.locks[p].exchange(true, std::memory_order_acquire)) std::this_thread::yield();
          // The reference's writes stay here: they rewrite what the node has.
          const uint32_t g = bump ? f.generation[p].load() + 1 : f.generation[p].load();
          alignas(64) std::byte page[kPage];
          fill(page, p, g);
          const auto t0 = std::chrono::steady_clock::now();
          *reinterpret_cast<volatile std::byte*>(a + kPage - 1) = page[kPage - 1];
          took = static_cast<uint64_t>((std::chrono::steady_clock::now() - t0).count());
          std::memcpy(a, page, kPage);
          f.generation[p].store(g);
          f.locks[p].store(false, std::memory_order_release);
        } else {
          const auto t0 = std::chrono::steady_clock::now();
          (void)*reinterpret_cast<volatile const std::byte*>(a);
          took = static_cast<uint64_t>((std::chrono::steady_clock::now() - t0).count());
        }
        ++out.count;
        if (took >= kFaultNs) out.fault_ns.push_back(took);
      }
    }
  };
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < kThreads; ++t) ts.emplace_back(worker, t);
  const auto w0 = std::chrono::steady_clock::now();
  while (phase.load() == 0 && resident() < warm_pages &&
         std::chrono::steady_clock::now() - w0 < std::chrono::seconds(60)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  phase.store(1);
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  phase.store(2);
  for (auto& t : ts) t.join();
  Touches all;
  for (auto& m : mine) {
    all.count += m.count;
    all.fault_ns.insert(all.fault_ns.end(), m.fault_ns.begin(), m.fault_ns.end());
  }
  return all;
}

// Pages whose bytes are not the generation last written, as a second
// destination that attaches the node reads them.
uint64_t verify_node(const Farm& f) {
  AttachOptions o;
  o.background_pull = true;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (;;) {
    try {
      Region r = attach(f.uri, o);
      if (!r.wait_complete(std::chrono::minutes(5))) throw Error(Errc::kIo, "verifying: " + r.error());
      uint64_t wrong = 0;
      for (size_t p = 0; p < f.pages.count; ++p) {
        wrong += holds(r.data() + p * kPage, p, f.pages.generation[p].load()) ? 0 : 1;
      }
      return wrong;
    } catch (const Error& e) {
      if (e.code() != Errc::kLeased || std::chrono::steady_clock::now() > deadline) throw;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
}

RunResult run_one(Farm& f, const Sampler& s, const RunSpec& spec, double seconds) {
  RunResult res;
  res.spec = spec;
  AttachOptions o;
  o.background_pull = false;
  o.prefetch = true;  // random touches pay nothing for it; the warm-up's sweep fills the cache with it
  o.handler_threads = 2;
  o.eviction = spec.policy;
  res.cache_bytes = spec.cache_share > 0 ? static_cast<uint64_t>(spec.cache_share * f.pages.count) * kPage : 0;
  o.cache_bytes = res.cache_bytes;
  Region r = [&] {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    for (;;) {
      try {
        return attach(f.uri, o);
      } catch (const Error& e) {
        if (e.code() != Errc::kLeased || std::chrono::steady_clock::now() > deadline) throw;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
  }();
  const bool cached = res.cache_bytes > 0;
  // The no-limit reference starts cold (every page faulted once); a cache
  // starts full, so that the measured touches evict.
  const uint64_t warm_pages = cached ? std::min<uint64_t>(res.cache_bytes / kPage, f.pages.count) * 9 / 10 : 0;
  Touches t = touch(
      f.pages, r.data(), [&r] { return r.stats().pages_present; }, s, spec, cached, warm_pages, seconds);
  res.touches = t.count;
  res.touches_per_second = static_cast<double>(res.touches) / seconds;
  res.faults = summarize_samples(t.fault_ns);
  if (cached) {
    const FlushReport fr = r.flush();
    res.unsaved_pages = fr.pages_unsaved;
  }
  const Stats st = r.stats();
  if (r.failed()) throw Error(Errc::kIo, "farmem run failed: " + r.error());
  res.pages_evicted = st.pages_evicted;
  res.bytes_written_back = st.bytes_written_back;
  res.max_resident_bytes = (cached ? st.max_resident_pages : st.pages_present) * kPage;
  { Region gone = std::move(r); }
  if (cached) res.wrong_pages = verify_node(f) + res.unsaved_pages;
  return res;
}

nlohmann::json to_json(const RunResult& r) {
  return {{"cache_share", r.spec.cache_share},
          {"access", name(r.spec.access)},
          {"write_share", r.spec.write_share},
          {"policy", r.spec.policy == AttachOptions::Eviction::kClock ? "clock" : "fifo"},
          {"cache_bytes", r.cache_bytes},
          {"touches", r.touches},
          {"touches_per_second", r.touches_per_second},
          {"faults", r.faults.count},
          {"fault_p50_ns", r.faults.p50_ns},
          {"fault_p99_ns", r.faults.p99_ns},
          {"pages_evicted", r.pages_evicted},
          {"bytes_written_back", r.bytes_written_back},
          {"max_resident_bytes", r.max_resident_bytes},
          {"wrong_pages", r.wrong_pages}};
}

void print_row(const RunResult& r, const char* label, const char* policy = nullptr) {
  std::printf("%-9s %-8s %5.2f  %-5s %12.0f %10.1f %10.1f %10llu %10s %10s %6llu\n", label, name(r.spec.access),
              r.spec.write_share,
              policy != nullptr                                  ? policy
              : r.spec.cache_share == 0                          ? "-"
              : r.spec.policy == AttachOptions::Eviction::kClock ? "clock"
                                                                 : "fifo",
              r.touches_per_second, r.faults.p50_ns / 1e3, r.faults.p99_ns / 1e3,
              static_cast<unsigned long long>(r.pages_evicted), format_bytes(r.bytes_written_back).c_str(),
              format_bytes(r.max_resident_bytes).c_str(), static_cast<unsigned long long>(r.wrong_pages));
  std::fflush(stdout);
}

// The kernel's own answer, for reference: the same access to the same
// bytes in plain anonymous memory, in a child process inside a memory
// cgroup limited to the cache's size, swapping to a zram device. Needs
// root, zram and the cgroup memory controller; says why not otherwise.
class SwapReference {
 public:
  // Sets up a zram swap device of `bytes`; null (and *why) where it cannot.
  static std::unique_ptr<SwapReference> open(uint64_t bytes, std::string* why) {
    if (::geteuid() != 0) {
      *why = "needs root (a zram swap device and a memory cgroup)";
      return nullptr;
    }
    if (::access(kCgroup, W_OK) != 0) {
      *why = std::string("no cgroup v1 memory controller at ") + kCgroup;
      return nullptr;
    }
    std::ifstream add("/sys/class/zram-control/hot_add");
    int n = -1;
    if (!(add >> n) || n < 0) {
      *why = "no zram (/sys/class/zram-control)";
      return nullptr;
    }
    auto ref = std::unique_ptr<SwapReference>(new SwapReference(n));
    const std::string dev = "/dev/zram" + std::to_string(n);
    if (!write_file("/sys/block/zram" + std::to_string(n) + "/disksize", std::to_string(bytes)) ||
        std::system(("mkswap " + dev + " >/dev/null 2>&1").c_str()) != 0 || ::swapon(dev.c_str(), 0) != 0) {
      *why = "cannot set up " + dev + " as swap (" + std::strerror(errno) + ")";
      return nullptr;
    }
    ref->swapped_on_ = true;
    return ref;
  }
  SwapReference(const SwapReference&) = delete;
  SwapReference& operator=(const SwapReference&) = delete;
  ~SwapReference() {
    const std::string dev = "/dev/zram" + std::to_string(device_);
    if (swapped_on_) ::swapoff(dev.c_str());
    write_file("/sys/block/zram" + std::to_string(device_) + "/reset", "1");
    write_file("/sys/class/zram-control/hot_remove", std::to_string(device_));
  }

  // One run in a child limited to `limit` bytes: fills `pages` pages (each
  // page's generation 1), then touches them as a pagewire run does.
  RunResult run(const Sampler& s, const RunSpec& spec, size_t pages, uint64_t limit, double seconds) {
    RunResult res;
    res.spec = spec;
    res.cache_bytes = limit;
    const std::string group = std::string(kCgroup) + "/pagewire-farmem-" + std::to_string(::getpid());
    if (::mkdir(group.c_str(), 0755) != 0 && errno != EEXIST) throw_errno("mkdir " + group);
    struct Out {
      uint64_t touches, faults, p50, p99, wrong, max_usage;
    } out{};
    int fds[2];
    if (::pipe(fds) != 0) throw_errno("pipe");
    // Limited before the child joins, so that it never holds more.
    const bool limited = write_file(group + "/memory.limit_in_bytes", std::to_string(limit));
    const pid_t child = limited ? ::fork() : -1;
    if (child == 0) {
      ::close(fds[0]);
      Out o{};
      if (write_file(group + "/cgroup.procs", std::to_string(::getpid()))) {
        auto* base = static_cast<std::byte*>(
            ::mmap(nullptr, pages * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        if (base != MAP_FAILED) {
          ::madvise(base, pages * kPage, MADV_NOHUGEPAGE);
          Pages mine(pages);
          for (size_t p = 0; p < pages; ++p) {
            fill(base + p * kPage, p, 1);
            mine.generation[p].store(1);
          }
          Touches t = touch(
              mine, base, [] { return uint64_t{0}; }, s, spec, true, 0, seconds);
          const LatencySummary l = summarize_samples(t.fault_ns);
          o.touches = t.count;
          o.faults = l.count;
          o.p50 = l.p50_ns;
          o.p99 = l.p99_ns;
          for (size_t p = 0; p < pages; ++p) o.wrong += holds(base + p * kPage, p, mine.generation[p].load()) ? 0 : 1;
          std::ifstream(group + "/memory.max_usage_in_bytes") >> o.max_usage;
        }
      }
      [[maybe_unused]] ssize_t w = ::write(fds[1], &o, sizeof o);
      ::_exit(0);
    }
    ::close(fds[1]);
    const bool got = child > 0 && ::read(fds[0], &out, sizeof out) == static_cast<ssize_t>(sizeof out);
    ::close(fds[0]);
    if (child > 0) ::waitpid(child, nullptr, 0);
    ::rmdir(group.c_str());
    if (!got || out.touches == 0) throw std::runtime_error("the memory-cgroup child measured nothing");
    res.touches = out.touches;
    res.touches_per_second = static_cast<double>(out.touches) / seconds;
    res.faults.count = out.faults;
    res.faults.p50_ns = out.p50;
    res.faults.p99_ns = out.p99;
    res.wrong_pages = out.wrong;
    res.max_resident_bytes = out.max_usage;
    return res;
  }

 private:
  static constexpr const char* kCgroup = "/sys/fs/cgroup/memory";
  explicit SwapReference(int device) : device_(device) {}
  static bool write_file(const std::string& path, const std::string& text) {
    std::ofstream f(path);
    f << text;
    f.flush();
    return static_cast<bool>(f);
  }
  int device_;
  bool swapped_on_ = false;
};

nlohmann::json memcg_json(const std::vector<RunResult>& runs, const std::string& why) {
  nlohmann::json j = {{"ran", !runs.empty()}};
  if (runs.empty()) {
    j["why_not"] = why;
    return j;
  }
  nlohmann::json rows = nlohmann::json::array();
  for (const RunResult& r : runs) {
    nlohmann::json row = to_json(r);
    row["policy"] = "linux";
    rows.push_back(row);
  }
  j["runs"] = rows;
  return j;
}

}  // namespace

int run_farmem_bench(const BenchConfig& c) {
  if (!c.uri.empty()) throw std::invalid_argument("--suite farmem starts its own memory node: drop --uri");
  const uint64_t size = c.size / kPage * kPage;
  if (size < 1024 * kPage) throw std::invalid_argument("--suite farmem needs --size of at least 4M");
  const double seconds = c.farmem_seconds;
  Farm f(size, c.addr);
  std::printf("pagewire bench --suite farmem: a %s memory node in this process (tcp, loopback); %u touching "
              "threads, 2 handlers, 1 evicting thread, all placed by the scheduler (free); %.1f s measured per run "
              "after a warm-up that fills the cache; a fault is a touch that took 5 us or more, timed by the touching "
              "thread\n",
              format_bytes(size).c_str(), kThreads, seconds);
  fill_node(f);
  const std::vector<double> shares = {0.25, 0.5, 1.0};
  const std::vector<Access> accesses = {Access::kUniform, Access::kZipf};
  const std::vector<double> writes = {0.0, 0.5};
  std::printf("\n%-9s %-8s %5s  %-5s %12s %10s %10s %10s %10s %10s %6s\n", "cache", "access", "write", "policy",
              "touches/s", "p50 us", "p99 us", "evicted", "written", "resident", "wrong");
  std::vector<RunResult> refs;
  std::vector<RunResult> runs;
  std::vector<RunResult> swapped;
  std::string no_swap_why = "not asked for (--no-memcg-zram)";
  // A cgroup of a few MiB would hold less than the child's own memory.
  const bool big_enough = size / 4 >= (64u << 20);
  if (c.farmem_memcg_zram && !big_enough) no_swap_why = "the region is too small (under 256 MiB)";
  std::unique_ptr<SwapReference> swap = c.farmem_memcg_zram && big_enough ? SwapReference::open(size, &no_swap_why)
                                                                          : nullptr;
  for (Access a : accesses) {
    const Sampler s(f.pages.count, a);
    if (swap) {
      for (double share : {0.25, 0.5}) {
        for (double w : writes) {
          try {
            swapped.push_back(swap->run(s, {share, a, w, AttachOptions::Eviction::kClock}, f.pages.count,
                                        static_cast<uint64_t>(share * static_cast<double>(size)), seconds));
            char label[16];
            std::snprintf(label, sizeof label, "%.0f%% swap", share * 100);
            print_row(swapped.back(), label, "linux");
          } catch (const std::exception& e) {
            no_swap_why = e.what();
            swap.reset();
            break;
          }
        }
        if (!swap) break;
      }
    }
    for (double w : writes) {
      refs.push_back(run_one(f, s, {0, a, w, AttachOptions::Eviction::kClock}, seconds));
      print_row(refs.back(), "no limit");
    }
    for (double share : shares) {
      for (double w : writes) {
        for (auto pol : {AttachOptions::Eviction::kClock, AttachOptions::Eviction::kFifo}) {
          runs.push_back(run_one(f, s, {share, a, w, pol}, seconds));
          char label[16];
          std::snprintf(label, sizeof label, "%.0f%%", share * 100);
          print_row(runs.back(), label);
        }
      }
    }
  }
  // The bars.
  std::vector<Mark> marks;
  bool all_right = true;
  bool bounded = true;
  for (const RunResult& r : runs) {
    all_right = all_right && r.wrong_pages == 0;
    bounded = bounded && static_cast<double>(r.max_resident_bytes) <= 1.1 * static_cast<double>(r.cache_bytes);
  }
  marks.push_back({all_right, "wrong_pages 0 in every run (flushed, then read back by a second destination)"});
  marks.push_back({bounded, "max_resident_bytes at most 1.1x the cache in every run"});
  nlohmann::json ratios = nlohmann::json::array();
  for (const RunResult& r : runs) {
    if (r.spec.cache_share != 0.5 || r.spec.access != Access::kZipf) continue;
    for (const RunResult& ref : refs) {
      if (ref.spec.access != r.spec.access || ref.spec.write_share != r.spec.write_share) continue;
      const double ratio = ref.faults.p50_ns > 0 ? static_cast<double>(r.faults.p50_ns) / ref.faults.p50_ns : 0;
      char what[160];
      std::snprintf(what, sizeof what,
                    "cache 50%%, zipf, write %.1f, %s: fault p50 %.1f us is %.2fx the no-limit %.1f us (<= 1.3x)",
                    r.spec.write_share, r.spec.policy == AttachOptions::Eviction::kClock ? "clock" : "fifo",
                    r.faults.p50_ns / 1e3, ratio, ref.faults.p50_ns / 1e3);
      marks.push_back({ratio <= 1.3, what});
      ratios.push_back({{"write_share", r.spec.write_share},
                        {"policy", r.spec.policy == AttachOptions::Eviction::kClock ? "clock" : "fifo"},
                        {"fault_p50_ratio", ratio}});
    }
  }
  std::printf("\n");
  print_marks(marks);
  if (swapped.empty()) {
    std::printf("\nmemcg + zram reference: not run (%s)\n", no_swap_why.c_str());
  } else {
    std::printf("\nmemcg + zram reference (rows \"swap\"): Linux swapping the same access in a memory cgroup "
                "limited to the cache size, to zram; not a bar\n");
  }
  swap.reset();
  nlohmann::json jr = nlohmann::json::array();
  for (const auto& r : runs) jr.push_back(to_json(r));
  nlohmann::json jref = nlohmann::json::array();
  for (const auto& r : refs) jref.push_back(to_json(r));
  write_report(c.json_path, {{"farmem",
                              {{"size", size},
                               {"threads", kThreads},
                               {"placement", "free"},
                               {"seconds_per_run", seconds},
                               {"runs", jr},
                               {"no_limit", jref},
                               {"zipf_50_fault_p50_ratio", ratios},
                               {"memcg_zram", memcg_json(swapped, no_swap_why)}}}});
  // Exit status 1 for a wrong page or an unbounded cache; the timed bar is
  // printed (MISS) but, timings being what they are here, not an error.
  return all_right && bounded ? 0 : 1;
}

}  // namespace pagewire::cli
