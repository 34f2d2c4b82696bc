#include "tools/cli_util.h"

#include <dirent.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string_view>

namespace pagewire::cli {

uint64_t parse_size(const std::string& text) {
  const char* example = " is not a size (e.g. 4096, 64K, 256M, 1G)";
  // Digits first: stoull alone would take "-1" and wrap it.
  if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0])))
    throw std::invalid_argument("'" + text + "'" + example);
  size_t pos = 0;
  unsigned long long v = 0;
  try {
    v = std::stoull(text, &pos, 10);
  } catch (const std::exception&) {
    throw std::invalid_argument("'" + text + "'" + example);
  }
  std::string unit = text.substr(pos);
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  // K, M, G or T, alone or followed by B or iB (KiB, KB); or nothing.
  const bool prefixed = !unit.empty() && std::string_view("KMGT").find(unit[0]) != std::string_view::npos;
  if (prefixed && (unit.substr(1) == "IB" || unit.substr(1) == "B")) unit = unit.substr(0, 1);
  uint64_t mult = 1;
  if (unit.empty() || unit == "B")
    mult = 1;
  else if (unit == "K")
    mult = 1ull << 10;
  else if (unit == "M")
    mult = 1ull << 20;
  else if (unit == "G")
    mult = 1ull << 30;
  else if (unit == "T")
    mult = 1ull << 40;
  else
    throw std::invalid_argument("'" + text + "': unknown size unit '" + text.substr(pos) + "' (K, M, G or T)");
  if (v > (~0ull) / mult) throw std::invalid_argument("'" + text + "' is too large");
  return v * mult;
}

uint64_t parse_seed(const std::string& text) {
  // Decimal, or hex with 0x; the whole text, and no sign.
  const bool digits_first = !text.empty() && std::isdigit(static_cast<unsigned char>(text[0]));
  size_t pos = 0;
  uint64_t v = 0;
  try {
    if (digits_first) v = std::stoull(text, &pos, 0);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (!digits_first || pos != text.size()) {
    throw std::invalid_argument("'" + text + "' is not a seed (a number, decimal or 0x hex)");
  }
  return v;
}

std::string format_bytes(uint64_t b) {
  char buf[32];
  if (b >= (1ull << 30) && b % (1ull << 30) == 0)
    std::snprintf(buf, sizeof buf, "%llu GiB", static_cast<unsigned long long>(b >> 30));
  else if (b >= (1ull << 20))
    std::snprintf(buf, sizeof buf, "%.0f MiB", static_cast<double>(b) / (1 << 20));
  else
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(b));
  return buf;
}

PatternSpec parse_pattern_spec(const std::string& text, uint64_t default_seed) {
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0)
    throw std::invalid_argument("--pattern wants NAME=SIZE[:SEED], got '" + text + "'");
  PatternSpec s;
  s.name = text.substr(0, eq);
  std::string rest = text.substr(eq + 1);
  s.seed = default_seed;
  const size_t colon = rest.find(':');
  if (colon != std::string::npos) {
    try {
      s.seed = parse_seed(rest.substr(colon + 1));
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("--pattern '" + text + "': " + e.what());
    }
    rest = rest.substr(0, colon);
  }
  s.size = parse_size(rest);
  if (s.size == 0) throw std::invalid_argument("--pattern size must be positive");
  return s;
}

NodeSpec parse_node_spec(const std::string& text) {
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0) throw std::invalid_argument("--memory wants NAME=SIZE, got '" + text + "'");
  NodeSpec n;
  n.name = text.substr(0, eq);
  try {
    n.size = parse_size(text.substr(eq + 1));
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument("--memory '" + text + "': " + e.what());
  }
  if (n.size == 0) throw std::invalid_argument("--memory size must be positive");
  return n;
}

namespace {
cpu_set_t cpus_for(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (cpu >= 0) {
    CPU_SET(cpu, &set);
  } else {
    const long n = ::sysconf(_SC_NPROCESSORS_ONLN);
    for (long i = 0; i < n; ++i) CPU_SET(static_cast<int>(i), &set);
  }
  return set;
}
}  // namespace

void pin_this_thread(int cpu) {
  cpu_set_t set = cpus_for(cpu);
  ::pthread_setaffinity_np(::pthread_self(), sizeof set, &set);
}

void pin_process(pid_t pid, int cpu) {
  cpu_set_t set = cpus_for(cpu);
  const std::string dir = "/proc/" + std::to_string(pid) + "/task";
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    ::sched_setaffinity(static_cast<pid_t>(std::stol(e->d_name)), sizeof set, &set);
  }
  ::closedir(d);
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

MachineBusy::MachineBusy() : start_(sample()) {}

double MachineBusy::busy() const {
  const auto [busy, total] = sample();
  if (total <= start_.second) return 0;
  return static_cast<double>(busy - start_.first) / static_cast<double>(total - start_.second);
}

std::pair<uint64_t, uint64_t> MachineBusy::sample() {
  std::ifstream in("/proc/stat");
  std::string cpu;
  in >> cpu;  // the first line sums every CPU
  uint64_t busy = 0;
  uint64_t total = 0;
  for (int field = 0; field < 8; ++field) {  // user nice system idle iowait irq softirq steal
    uint64_t v = 0;
    if (!(in >> v)) break;
    total += v;
    if (field != 3 && field != 4) busy += v;
  }
  return {busy, total};
}

Progress::Progress(std::string label, uint64_t total)
    : label_(std::move(label)), total_(total), start_s_(now_seconds()) {
  // A serial console (as in the Soft-RoCE guest) is a tty with no TERM:
  // redrawing a line there only floods the log.
  const char* term = std::getenv("TERM");
  tty_ = ::isatty(STDERR_FILENO) == 1 && term != nullptr && std::string(term) != "dumb";
}

void Progress::update(uint64_t done) {
  if (!tty_) return;
  const double now = now_seconds();
  if (now - last_s_ < 0.2 && done < total_) return;
  last_s_ = now;
  const double elapsed = now - start_s_;
  const double rate = elapsed > 0 ? static_cast<double>(done) / elapsed : 0;
  const double eta = rate > 0 ? static_cast<double>(total_ - done) / rate : 0;
  std::fprintf(stderr, "\r%s: %llu/%llu pages  %.1f MB/s  ETA %.0fs   ", label_.c_str(),
               static_cast<unsigned long long>(done), static_cast<unsigned long long>(total_), rate * 4096 / 1e6, eta);
  std::fflush(stderr);
}

void Progress::finish() {
  if (!tty_) return;
  std::fprintf(stderr, "\r\033[K");
  std::fflush(stderr);
}

}  // namespace pagewire::cli
