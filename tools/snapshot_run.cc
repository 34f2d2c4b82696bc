#include "tools/snapshot_run.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "common/auth.h"
#include "common/unique_fd.h"
#include "nlohmann/json.hpp"
#include "tools/cli_util.h"
#include "tools/page_writers.h"
#include "tools/pattern.h"
#include "transport/transport.h"

namespace pagewire::cli {
namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kPage = 4096;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

uint64_t count_wrong(const std::byte* image, const std::vector<uint64_t>& want, size_t from) {
  uint64_t wrong = 0;
  for (size_t i = 0; i + from < want.size(); ++i) {
    if (!holds_generation(image + i * kPage, (from + i) * kPage, kPage, want[from + i])) ++wrong;
  }
  return wrong;
}

uint64_t wrong_in_file(const std::string& path, const std::vector<uint64_t>& want) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw_errno("open " + path + " to verify");
  const size_t length = want.size() * kPage;
  void* p = ::mmap(nullptr, length, PROT_READ, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) throw_errno("mmap " + path + " to verify");
  Mapping image(p, length);
  return count_wrong(image.data(), want, 0);
}

uint64_t wrong_on_node(const std::string& uri, const std::vector<uint64_t>& want, const std::string& key_file) {
  TransportOptions o;
  o.key = AuthKey::from_option(key_file);
  std::unique_ptr<Transport> t = connect_transport(uri, o);
  std::unique_ptr<Channel> ch = t->open_channel(ChannelUse::kBulk);
  const size_t chunk = std::min<size_t>(t->capabilities().max_read_bytes, 1u << 20) / kPage * kPage;
  Mapping buffer = Mapping::anonymous(chunk);
  ch->register_buffer(buffer.data(), chunk);
  uint64_t wrong = 0;
  WaitResult result;
  const size_t length = want.size() * kPage;
  for (size_t off = 0; off < length; off += chunk) {
    const auto len = static_cast<uint32_t>(std::min(chunk, length - off));
    const ReadOp op{off, len, buffer.data(), 0};
    ch->post({&op, 1});
    do {
      result.clear();
      ch->wait(result, 10000);
      if (result.channel_error != Errc::kOk) throw Error(result.channel_error, result.channel_error_text);
    } while (result.completions.empty());
    if (result.completions[0].status != Errc::kOk) throw Error(result.completions[0].status, "reading " + uri);
    for (size_t i = 0; i < len / kPage; ++i) {
      const size_t p = off / kPage + i;
      if (!holds_generation(buffer.data() + i * kPage, p * kPage, kPage, want[p])) ++wrong;
    }
  }
  return wrong;
}

bool is_node(const std::string& target) { return target.find("://") != std::string::npos; }

// fork(): the child holds the instant (the kernel copies on write) and
// writes it out; the parent's writers go on.
void fork_snapshot(const SnapshotRunConfig& c, std::byte* base, PageWriters& w, SnapshotRunResult& r,
                   std::vector<uint64_t>& instant) {
  if (is_node(c.target)) {
    throw Error(Errc::kInvalidArgument, "fork-based snapshots write files only (a forked child cannot reuse "
                                        "the parent's RDMA or io_uring state)");
  }
  UniqueFd fd(::open(c.target.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd) throw_errno("open " + c.target);
  const auto t0 = Clock::now();
  w.pause();
  instant = w.generations();
  const pid_t child = ::fork();
  if (child != 0) {
    w.resume();  // (the parent's writers; the child has none)
    r.pause_ms = seconds_since(t0) * 1e3;
  }
  if (child < 0) throw_errno("fork");
  if (child == 0) {
    size_t done = 0;
    while (done < c.size) {
      const ssize_t n = ::pwrite(fd.get(), base + done, c.size - done, static_cast<off_t>(done));
      if (n <= 0) ::_exit(1);
      done += static_cast<size_t>(n);
    }
    ::_exit(::fsync(fd.get()) == 0 ? 0 : 1);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) r.error = "the forked child failed to write the image";
}

}  // namespace

SnapshotRunResult run_snapshot(const SnapshotRunConfig& c) {
  if (c.size < kPage * c.threads || c.size % kPage != 0) {
    throw Error(Errc::kInvalidArgument, "snapshot: --size must be a multiple of 4 KiB, a page per thread at least");
  }
  if (c.threads == 0 || c.threads > 256) throw Error(Errc::kInvalidArgument, "snapshot: 1..256 writer threads");
  if (c.target.empty()) throw Error(Errc::kInvalidArgument, "snapshot: no --target (a file path or a node's URI)");
  if (c.method != "fork" && c.cow_bytes < kPage) {
    throw Error(Errc::kInvalidArgument, "snapshot: the copy-on-write buffer must hold at least one page (4 KiB)");
  }
  if (c.method == "fork" && is_node(c.target)) {
    throw Error(Errc::kInvalidArgument, "fork-based snapshots write files only (a forked child cannot reuse "
                                        "the parent's RDMA or io_uring state)");
  }
  SnapshotRunResult r;
  r.method = c.method;
  r.target = is_node(c.target) ? "node" : "file";
  r.cow_bytes = c.method == "fork" ? 0 : c.cow_bytes;
  r.rate = c.rate;
  const size_t pages = c.size / kPage;
  Mapping mem = Mapping::anonymous(c.size);
  ::madvise(mem.data(), mem.size(), MADV_NOHUGEPAGE);
  PageWriters w(mem.data(), pages, kPage, c.threads, c.rate, pages);
  // The writers' rate without a snapshot.
  const uint64_t b0 = w.writes();
  std::this_thread::sleep_for(std::chrono::duration<double>(c.baseline_seconds));
  r.baseline_pages_per_s = static_cast<double>(w.writes() - b0) / c.baseline_seconds;
  std::vector<uint64_t> instant;
  const auto started = Clock::now();
  const uint64_t before = w.writes();
  if (c.method == "fork") {
    fork_snapshot(c, mem.data(), w, r, instant);
    r.seconds = seconds_since(started);
  } else {
    SnapshotOptions o;
    o.cow_bytes = c.cow_bytes;
    o.key_file = c.key_file;
    o.pause = [&] {
      w.pause();
      instant = w.generations();
    };
    o.resume = [&] { w.resume(); };
    // A node lets the last writer's lease go a moment after its connection closes.
    const auto give_up = Clock::now() + std::chrono::seconds(5);
    auto take = [&] {
      for (;;) {
        try {
          return snapshot(mem.data(), c.size, c.target, o);
        } catch (const Error& e) {
          if (e.code() != Errc::kLeased || Clock::now() > give_up) throw;
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
      }
    };
    Snapshot s = take();
    while (!s.wait(std::chrono::milliseconds(500))) {
      if (c.on_progress) c.on_progress(s.progress());
    }
    r.progress = s.progress();
    r.seconds = r.progress.seconds;
    r.pause_ms = static_cast<double>(r.progress.pause_ns) / 1e6;
    r.writer_stall_ms_total = static_cast<double>(r.progress.stall_ns_total) / 1e6;
    r.error = r.progress.error;
  }
  const double during = seconds_since(started);
  r.writer_pages_per_s = static_cast<double>(w.writes() - before) / during;
  r.writer_slowdown = r.writer_pages_per_s > 0 ? r.baseline_pages_per_s / r.writer_pages_per_s : 0;
  w.stop();
  if (r.error.empty()) {
    r.wrong_pages = is_node(c.target) ? wrong_on_node(c.target, instant, c.key_file) : wrong_in_file(c.target, instant);
  }
  return r;
}

int cmd_snapshot(const SnapshotCommand& s) {
  SnapshotRunConfig c = s.run;
  std::printf("snapshot of %s written by %u threads (%s) to %s, copy-on-write buffer %s\n",
              format_bytes(c.size).c_str(), c.threads,
              c.rate == 0 ? "as fast as they go" : (std::to_string(c.rate) + " pages/s each").c_str(), c.target.c_str(),
              format_bytes(c.cow_bytes).c_str());
  c.on_progress = [](const SnapshotProgress& p) {
    std::printf("  %5.1f s  saved %llu/%llu pages (%llu zero)  copy-on-write %llu/%llu slots (max %llu)  "
                "writer stalls %llu (%.1f ms)\n",
                p.seconds, static_cast<unsigned long long>(p.pages_saved),
                static_cast<unsigned long long>(p.pages_total), static_cast<unsigned long long>(p.pages_zero),
                static_cast<unsigned long long>(p.cow_in_use), static_cast<unsigned long long>(p.cow_slots),
                static_cast<unsigned long long>(p.cow_max_in_use), static_cast<unsigned long long>(p.writer_stalls),
                static_cast<double>(p.stall_ns_total) / 1e6);
    std::fflush(stdout);
  };
  const SnapshotRunResult r = run_snapshot(c);
  if (!r.error.empty()) {
    std::printf("snapshot FAILED: %s (the workload went on, with no protection left)\n", r.error.c_str());
    return 1;
  }
  const SnapshotProgress& p = r.progress;
  std::printf("saved %llu pages in %.2f s: %llu zero (not sent), %llu through the copy-on-write buffer (max %llu of "
              "%llu slots in use), %s sent\n",
              static_cast<unsigned long long>(p.pages_saved), r.seconds, static_cast<unsigned long long>(p.pages_zero),
              static_cast<unsigned long long>(p.pages_copied), static_cast<unsigned long long>(p.cow_max_in_use),
              static_cast<unsigned long long>(p.cow_slots), format_bytes(p.bytes_sent).c_str());
  std::printf("writers: stood still %.2f ms at the instant; %llu write faults, %llu stalls (%.1f ms in all); "
              "%.0f pages/s during the snapshot against %.0f without (slowdown %.2fx)\n",
              r.pause_ms, static_cast<unsigned long long>(p.writer_faults),
              static_cast<unsigned long long>(p.writer_stalls), r.writer_stall_ms_total, r.writer_pages_per_s,
              r.baseline_pages_per_s, r.writer_slowdown);
  if (r.wrong_pages != 0) {
    std::printf("VERIFY FAILED: %llu pages of the image differ from the instant\n",
                static_cast<unsigned long long>(r.wrong_pages));
    return 1;
  }
  std::printf("verified: every page of the image is the page at the instant\n");
  if (!s.json_path.empty()) {
    nlohmann::json j = {{"snapshot",
                         {{"seconds", r.seconds},
                          {"pause_ms", r.pause_ms},
                          {"pages_saved", p.pages_saved},
                          {"pages_zero", p.pages_zero},
                          {"pages_copied", p.pages_copied},
                          {"writer_stalls", p.writer_stalls},
                          {"writer_stall_ms_total", r.writer_stall_ms_total},
                          {"writer_slowdown", r.writer_slowdown},
                          {"wrong_pages", r.wrong_pages}}}};
    FILE* f = std::fopen(s.json_path.c_str(), "w");
    if (f == nullptr) throw_errno("open " + s.json_path);
    std::fputs(j.dump(2).c_str(), f);
    std::fclose(f);
  }
  return 0;
}

}  // namespace pagewire::cli
