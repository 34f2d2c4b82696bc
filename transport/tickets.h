// Single-use tickets that let an RDMA connect stand on a TCP handshake that
// proved the key. An RDMA connect request carries 56 bytes and is answered
// at once with the region's address and rkey: no room for a challenge and
// its response. So a destination with a key first proves it over TCP
// (protocol.h, kHelloTicket) and is handed a random 64-bit ticket, bound to
// the region's name, good once and for a few seconds; its RDMA connect
// carries the ticket, and the server accepts it only against one it issued.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>

namespace pagewire {

class TicketBook {
 public:
  static constexpr auto kLifetime = std::chrono::seconds(10);
  // At most this many outstanding: a destination that asks for tickets and
  // never uses them cannot grow the book without bound.
  static constexpr size_t kMaxOutstanding = 4096;

  explicit TicketBook(std::chrono::milliseconds lifetime = kLifetime) : lifetime_(lifetime) {}

  std::chrono::milliseconds lifetime() const { return lifetime_; }
  // A fresh ticket for `name`, issued to the holder of its writer lease
  // `lease` (0: to a reader); 0 when the book is full (or no random bytes
  // came).
  uint64_t issue(const std::string& name, uint64_t lease = 0);
  // True once for a ticket issued for `name` and not yet expired, with the
  // lease it was issued with in *lease; the ticket is used up either way.
  bool redeem(uint64_t ticket, const std::string& name, uint64_t* lease = nullptr);

 private:
  using Clock = std::chrono::steady_clock;
  struct Entry {
    std::string name;
    uint64_t lease = 0;
    Clock::time_point expires;
  };
  void forget_expired_locked(Clock::time_point now);

  std::chrono::milliseconds lifetime_;
  std::mutex mu_;
  std::unordered_map<uint64_t, Entry> entries_;
};

}  // namespace pagewire
