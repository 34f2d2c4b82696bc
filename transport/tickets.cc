#include "transport/tickets.h"

#include <cstring>

#include "common/auth.h"

namespace pagewire {

uint64_t TicketBook::issue(const std::string& name, uint64_t lease) {
  // Never throws: it runs on a server's connection thread, and no ticket
  // (0) is an answer the destination reports.
  try {
    const Nonce random = fresh_nonce();
    uint64_t ticket = 0;
    std::memcpy(&ticket, random.data(), sizeof ticket);
    if (ticket == 0) ticket = 1;  // 0 means none
    const auto now = Clock::now();
    std::lock_guard lock(mu_);
    forget_expired_locked(now);
    if (entries_.size() >= kMaxOutstanding) return 0;
    entries_[ticket] = {name, lease, now + lifetime_};
    return ticket;
  } catch (const std::exception&) {
    return 0;
  }
}

bool TicketBook::redeem(uint64_t ticket, const std::string& name, uint64_t* lease) {
  const auto now = Clock::now();
  std::lock_guard lock(mu_);
  const auto it = entries_.find(ticket);
  if (it == entries_.end()) return false;
  const bool good = it->second.name == name && now < it->second.expires;
  if (good && lease != nullptr) *lease = it->second.lease;
  entries_.erase(it);
  return good;
}

void TicketBook::forget_expired_locked(Clock::time_point now) {
  std::erase_if(entries_, [now](const auto& e) { return e.second.expires <= now; });
}

}  // namespace pagewire
