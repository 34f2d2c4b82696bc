// Whether a region has completed or failed, and why it failed. Written by
// whichever thread decides it, waited on by the application.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>

namespace pagewire {

class RegionStatus {
 public:
  explicit RegionStatus(std::string name) : name_(std::move(name)) {}

  bool complete() const { return complete_.load(); }
  bool failed() const { return failed_.load(); }
  std::string error() const;
  // The first failure is kept (and logged); later ones only keep it failed.
  void record_failure(const std::string& text);
  void set_complete();
  // True once complete; false when failed or the timeout passed first.
  bool wait_complete(std::chrono::milliseconds timeout) const;

 private:
  const std::string name_;
  std::atomic<bool> complete_{false};
  std::atomic<bool> failed_{false};
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::string error_;
};

}  // namespace pagewire
