// `pagewire attach --precopy`: live migration from a source whose owner
// keeps writing, with each round, the downtime and the bytes on the wire
// printed, and the result checked against the paused source.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "pagewire/region.h"

namespace pagewire::cli {

// Reads the whole region from the source at `uri` afresh and compares it
// with `data` page by page; returns how many pages differ. The source must
// stand still (paused after a switchover).
// `key_file` as AttachOptions::key_file.
uint64_t pages_differing_from_source(const std::string& uri, const std::byte* data, size_t size, uint32_t page_size,
                                     const std::string& key_file = "");

struct MigrateCommand {
  std::string uri;
  AttachOptions options;
  unsigned threads = 2;  // the destination application: threads touching every page after the switchover
  bool verify = false;
  std::string json_path;
};

int cmd_migrate(const MigrateCommand& m);

}  // namespace pagewire::cli
