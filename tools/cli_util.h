// Small pieces the command line shares between its subcommands.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace pagewire::cli {

// "4096", "64K", "256M", "1G", "2GiB" -> bytes; throws std::invalid_argument.
uint64_t parse_size(const std::string& text);
// A pattern seed: decimal or 0x hex, the whole text; throws
// std::invalid_argument saying what is wrong.
uint64_t parse_seed(const std::string& text);
std::string format_bytes(uint64_t bytes);

// A pattern export given as NAME=SIZE[:SEED].
struct PatternSpec {
  std::string name;
  uint64_t size = 0;
  uint64_t seed = 0;
};
PatternSpec parse_pattern_spec(const std::string& text, uint64_t default_seed);

// A memory node (writable, zeroed memory) given as NAME=SIZE.
struct NodeSpec {
  std::string name;
  uint64_t size = 0;
};
NodeSpec parse_node_spec(const std::string& text);

// Pins the calling thread (cpu >= 0) or leaves it free (cpu < 0).
void pin_this_thread(int cpu);
// Pins every thread of process `pid` (all of them, when cpu < 0, to every CPU).
void pin_process(pid_t pid, int cpu);

// A progress line on stderr, redrawn in place, only when stderr is a
// terminal; finish() ends the line.
class Progress {
 public:
  Progress(std::string label, uint64_t total);
  void update(uint64_t done);
  void finish();

 private:
  std::string label_;
  uint64_t total_;
  bool tty_;
  double start_s_;
  double last_s_ = 0;
};

double now_seconds();

// How busy the whole machine's CPUs were between construction and busy()
// (from /proc/stat: 1.0 = every CPU busy the whole time). Shows when a
// benchmark is bound by CPU rather than by its transport.
class MachineBusy {
 public:
  MachineBusy();
  double busy() const;

 private:
  static std::pair<uint64_t, uint64_t> sample();  // (busy, total) jiffies
  std::pair<uint64_t, uint64_t> start_;
};

}  // namespace pagewire::cli
