// Pictures of a benchmark run, drawn by gnuplot (Debian's gnuplot-nox):
// latency CDFs on the left and, for a pull, bytes present over time on the
// right.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace pagewire::cli {

struct Series {
  std::string title;
  std::vector<std::pair<double, double>> points;
};

// (latency in us, fraction of samples at or below it), about 200 points.
std::vector<std::pair<double, double>> cdf_points(std::vector<uint64_t> samples_ns);

// Writes the PNG; throws std::runtime_error saying how to install gnuplot
// when it is missing.
void write_plot(const std::string& png_path, const std::string& title, const std::vector<Series>& cdfs,
                const std::vector<Series>& timeline);

}  // namespace pagewire::cli
