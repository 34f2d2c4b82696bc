#include "tools/plot.h"

#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <stdexcept>

namespace pagewire::cli {

std::vector<std::pair<double, double>> cdf_points(std::vector<uint64_t> samples) {
  std::vector<std::pair<double, double>> out;
  if (samples.empty()) return out;
  std::sort(samples.begin(), samples.end());
  const size_t n = samples.size();
  // Evenly in rank, and densely in the tail where the interest is.
  std::vector<double> qs;
  for (int i = 0; i <= 150; ++i) qs.push_back(i / 150.0 * 0.99);
  for (double q : {0.992, 0.994, 0.996, 0.998, 0.999, 0.9995, 0.9999, 1.0}) qs.push_back(q);
  for (double q : qs) {
    const auto i = std::min(n - 1, static_cast<size_t>(q * static_cast<double>(n - 1)));
    out.emplace_back(static_cast<double>(samples[i]) / 1000.0, q);
  }
  return out;
}

namespace {

void data_block(FILE* gp, const std::string& name, const Series& s) {
  std::fprintf(gp, "$%s << EOD\n", name.c_str());
  for (const auto& [x, y] : s.points) std::fprintf(gp, "%.6g %.6g\n", x, y);
  std::fprintf(gp, "EOD\n");
}

std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

}  // namespace

void write_plot(const std::string& png, const std::string& title, const std::vector<Series>& cdfs,
                const std::vector<Series>& timeline) {
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    throw std::runtime_error("--plot needs gnuplot: apt-get install gnuplot-nox");
  }
  FILE* gp = ::popen("gnuplot", "w");
  if (gp == nullptr) throw std::runtime_error("cannot start gnuplot");
  for (size_t i = 0; i < cdfs.size(); ++i) data_block(gp, "cdf" + std::to_string(i), cdfs[i]);
  for (size_t i = 0; i < timeline.size(); ++i) data_block(gp, "tl" + std::to_string(i), timeline[i]);
  const bool two = !timeline.empty();
  std::fprintf(gp, "set terminal pngcairo size %d,480 enhanced font 'sans,10'\n", two ? 1280 : 720);
  std::fprintf(gp, "set output %s\n", quoted(png).c_str());
  if (two) std::fprintf(gp, "set multiplot layout 1,2 title %s\n", quoted(title).c_str());
  std::fprintf(gp, "set grid\nset key bottom right\nset logscale x\n");
  std::fprintf(gp, "set xlabel 'latency (us, log scale)'\nset ylabel 'fraction of faults'\nset yrange [0:1]\n");
  if (!two) std::fprintf(gp, "set title %s\n", quoted(title).c_str());
  std::fprintf(gp, "plot ");
  for (size_t i = 0; i < cdfs.size(); ++i) {
    std::fprintf(gp, "%s$cdf%zu using 1:2 with lines lw 2 title %s", i ? ", " : "", i, quoted(cdfs[i].title).c_str());
  }
  std::fprintf(gp, "\n");
  if (two) {
    std::fprintf(gp, "unset logscale x\nset autoscale y\nset yrange [0:*]\nset key bottom right\n");
    std::fprintf(gp, "set xlabel 'time since attach (s)'\nset ylabel 'MiB present'\nplot ");
    for (size_t i = 0; i < timeline.size(); ++i) {
      std::fprintf(gp, "%s$tl%zu using 1:2 with lines lw 2 title %s", i ? ", " : "", i,
                   quoted(timeline[i].title).c_str());
    }
    std::fprintf(gp, "\nunset multiplot\n");
  }
  const int rc = ::pclose(gp);
  if (rc != 0) throw std::runtime_error("gnuplot failed writing " + png);
}

}  // namespace pagewire::cli
