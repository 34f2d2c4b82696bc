// Errors that pagewire reports. Setup paths throw pagewire::Error (or
// std::system_error where an errno says it all); the fault path returns an
// Errc and never throws across a thread boundary.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace pagewire {

enum class Errc : uint32_t {
  kOk = 0,
  kBadUri = 1,           // the URI does not parse
  kNotFound = 2,         // the server exports no region of that name
  kConnectFailed = 3,    // nothing answers at the address
  kProtocol = 4,         // the peer sent bytes that are not our protocol
  kOutOfBounds = 5,      // a read or write outside the region (or over the size limit)
  kIo = 6,               // a socket or device error
  kTimeout = 7,          // the peer stopped answering
  kClosed = 8,           // the peer closed the connection
  kUffdUnavailable = 9,  // userfaultfd cannot be opened here
  kInvalidArgument = 10,
  kCancelled = 11,      // the region is being torn down
  kNoMemory = 12,       // memory the region needs (2 MiB huge pages) is not reserved
  kBusy = 13,           // the server has all its connections in use
  kUnsupported = 14,    // the kernel or the peer lacks what this needs
  kSourceChanged = 15,  // a paused source was written (live migration)
  kLeased = 16,         // another destination holds the region's writer lease
  kAuth = 17,           // a peer without the key (or with another one)
};

std::string_view to_string(Errc code);

class Error : public std::runtime_error {
 public:
  Error(Errc code, const std::string& what) : std::runtime_error(what), code_(code) {}
  Errc code() const { return code_; }

 private:
  Errc code_;
};

}  // namespace pagewire
