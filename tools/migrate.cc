#include "tools/migrate.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "common/unique_fd.h"
#include "runtime/metrics.h"
#include "tools/cli_util.h"
#include "tools/workload.h"
#include "transport/transport.h"

namespace pagewire::cli {

uint64_t pages_differing_from_source(const std::string& uri, const std::byte* data, size_t size, uint32_t page_size,
                                     const std::string& key_file) {
  TransportOptions options;
  options.key = AuthKey::from_option(key_file);
  std::unique_ptr<Transport> t = connect_transport(uri, options);
  if (t->region().length != size) throw Error(Errc::kProtocol, uri + " is not the size of the region attached");
  std::unique_ptr<Channel> ch = t->open_channel(ChannelUse::kBulk);
  const size_t chunk = std::max<size_t>(
      page_size, std::min<size_t>(t->capabilities().max_read_bytes, 1 << 20) / page_size * page_size);
  Mapping buffer = Mapping::anonymous(chunk);
  const LocalBuffer local = ch->register_buffer(buffer.data(), chunk);
  uint64_t differ = 0;
  WaitResult result;
  for (size_t off = 0; off < size; off += chunk) {
    const auto len = static_cast<uint32_t>(std::min(chunk, size - off));
    const ReadOp op{off, len, local.base, 0};
    ch->post({&op, 1});
    for (;;) {
      result.clear();
      ch->wait(result, 10000);
      if (result.channel_error != Errc::kOk) throw Error(result.channel_error, result.channel_error_text);
      if (!result.completions.empty()) break;
    }
    if (result.completions[0].status != Errc::kOk) {
      throw Error(result.completions[0].status,
                  "reading " + uri + " to verify: " + std::string(to_string(result.completions[0].status)));
    }
    for (size_t p = 0; p < len; p += page_size) {
      const size_t n = std::min<size_t>(page_size, len - p);
      if (std::memcmp(local.base + p, data + off + p, n) != 0) ++differ;
    }
  }
  return differ;
}

int cmd_migrate(const MigrateCommand& m) {
  AttachOptions o = m.options;
  o.background_pull = true;
  o.precopy.enabled = true;
  // A progress line while a round runs (on a terminal), a line per round.
  auto line = std::make_shared<std::unique_ptr<Progress>>();
  unsigned round = 1;
  o.precopy.on_progress = [line, &round](const pagewire::Progress& p) {
    if (!*line) *line = std::make_unique<Progress>("round " + std::to_string(round), p.pages_total);
    (*line)->update(p.pages_present);
  };
  o.precopy.on_round = [line, &round](const PrecopyRound& r) {
    if (*line) {
      (*line)->finish();
      line->reset();
    }
    round = r.round + 1;
    std::printf("round %u: %llu pages, %s in %.2f s (%.1f MB/s); source wrote %.0f pages/s meanwhile\n", r.round,
                static_cast<unsigned long long>(r.pages), format_bytes(r.bytes).c_str(), r.seconds,
                r.seconds > 0 ? static_cast<double>(r.bytes) / 1e6 / r.seconds : 0.0, r.written_pages_per_second);
    std::fflush(stdout);
  };
  const double start = now_seconds();
  Region r = attach(m.uri, o);
  const MigrationReport& rep = r.migration();
  std::printf("switchover after %zu rounds (%s): downtime %.2f ms; %llu written pages left to postcopy\n",
              rep.rounds.size(), rep.switched_because.c_str(), rep.downtime_ms,
              static_cast<unsigned long long>(rep.pages_written_at_switch));
  // The application starts: it touches every page (demand faults) while
  // the pull takes the rest.
  WorkloadConfig w;
  w.threads = m.threads;
  w.verify = false;
  w.progress_label = "touching";
  const WorkloadResult res = run_workload(r.data(), r.size(), r.page_size(), w);
  Progress progress("pulling", r.size() / r.page_size());
  while (!r.wait_complete(std::chrono::milliseconds(200)) && !r.failed()) progress.update(r.progress().pages_present);
  progress.finish();
  const double total = now_seconds() - start;
  const Stats s = r.stats();
  std::printf("migrated %s in %.2f s: %s on the wire (%.2fx the region), %llu demand faults after the switchover\n",
              format_bytes(r.size()).c_str(), total, format_bytes(s.bytes_fetched).c_str(),
              static_cast<double>(s.bytes_fetched) / static_cast<double>(r.size()),
              static_cast<unsigned long long>(s.faults));
  if (!m.json_path.empty()) std::ofstream(m.json_path) << stats_to_json(s) << "\n";
  if (r.failed() || res.stopped_by_signal != 0) {
    std::printf("FAILED: %s\n", r.failed() ? r.error().c_str() : "a touching thread was stopped by a signal");
    return 1;
  }
  if (m.verify) {
    const uint64_t wrong = pages_differing_from_source(m.uri, r.data(), r.size(), r.page_size(), o.key_file);
    if (wrong != 0) {
      std::printf("VERIFY FAILED: %llu pages differ from the paused source\n", static_cast<unsigned long long>(wrong));
      return 1;
    }
    std::printf("verified: every byte of %s matches the paused source\n", format_bytes(r.size()).c_str());
  }
  return 0;
}

}  // namespace pagewire::cli
