#include "pagewire/error.h"

namespace pagewire {

std::string_view to_string(Errc code) {
  switch (code) {
    case Errc::kOk: return "ok";
    case Errc::kBadUri: return "bad URI";
    case Errc::kNotFound: return "no such region";
    case Errc::kConnectFailed: return "connect failed";
    case Errc::kProtocol: return "protocol error";
    case Errc::kOutOfBounds: return "read or write outside the region";
    case Errc::kIo: return "I/O error";
    case Errc::kTimeout: return "timed out";
    case Errc::kClosed: return "connection closed";
    case Errc::kUffdUnavailable: return "userfaultfd unavailable";
    case Errc::kInvalidArgument: return "invalid argument";
    case Errc::kCancelled: return "cancelled";
    case Errc::kNoMemory: return "no memory";
    case Errc::kBusy: return "the server has all its connections in use";
    case Errc::kUnsupported: return "not supported here";
    case Errc::kSourceChanged: return "the source was written after it paused";
    case Errc::kLeased: return "the region has another writer";
    case Errc::kAuth: return "authentication failed";
  }
  return "unknown error";
}

}  // namespace pagewire
