// The destination side's core: the region's mapping, its userfaultfd, the
// page-state table, and the handler threads that serve faults.
//
// Per fault: a handler reads the event, claims the page in the page table,
// posts a read into one of its staging slots, and when the read completes
// installs the page with UFFDIO_COPY, which wakes every thread parked on it.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "pagewire/region.h"
#include "runtime/metrics.h"
#include "runtime/page_table.h"
#include "runtime/uffd.h"
#include "runtime/unique_fd.h"
#include "transport/transport.h"

namespace pagewire {

class FaultEngine {
 public:
  FaultEngine(std::unique_ptr<Transport> transport, const AttachOptions& options);
  FaultEngine(const FaultEngine&) = delete;
  FaultEngine& operator=(const FaultEngine&) = delete;
  ~FaultEngine();

  std::byte* data() const { return region_.data(); }
  size_t size() const { return desc_.length; }
  uint32_t page_size() const { return desc_.page_size; }
  const std::string& name() const { return desc_.name; }
  std::string_view transport_name() const { return transport_->name(); }
  Stats stats() const;
  bool failed() const { return failed_.load(); }
  std::string error() const;

 private:
  friend class FaultEngineTestPeer;
  struct Handler;

  void run_handler(Handler& h);
  void read_faults(Handler& h);
  void complete(Handler& h, const ReadCompletion& c);
  void refuse_page(Handler& h, size_t page, Errc why, const std::string& text);
  void forget_pages(uint64_t start, uint64_t end);
  void record_failure(const std::string& text);

  // Members in creation order; destroyed in reverse: handlers (joined in
  // the destructor body) before the uffd, the uffd before the mapping.
  AttachOptions options_;
  std::unique_ptr<Transport> transport_;
  RegionDescriptor desc_;
  Mapping region_;
  Userfaultfd uffd_;
  PageTable pages_;
  UniqueFd stop_fd_;
  std::atomic<bool> failed_{false};
  mutable std::mutex error_mu_;
  std::string error_;
  std::vector<std::unique_ptr<Handler>> handlers_;
};

}  // namespace pagewire
