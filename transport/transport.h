// The transport interface: one-sided reads of a remote region into
// registered local memory, posted in batches, completions reaped in batches.
//
// A Transport stands for one attached region on one peer. Each fault handler
// thread opens its own Channel (a TCP connection or an RC queue pair with its
// completion queue) and is that channel's only user, so nothing on the fast
// path takes a lock. A channel also drives its thread's one blocking wait:
// the handler hands it the descriptors it watches (its userfaultfd, its stop
// eventfd), and wait() returns when a read completes or one of them fires.
// The stop descriptor is named as such: it also cuts a reconnect short.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/auth.h"
#include "pagewire/error.h"
#include "transport/watch_set.h"
#include "transport/zero_map.h"

namespace pagewire {

// What a destination learns about a region when it connects.
struct RegionDescriptor {
  std::string name;
  uint64_t length = 0;
  uint32_t page_size = 4096;
  uint32_t key = 0;          // names the region on its server (the rkey on RDMA)
  uint64_t remote_addr = 0;  // base address for RDMA READ; 0 on TCP
  // Which bytes these are: a reconnect to a source whose region has
  // another identity (restarted with other contents) is refused.
  uint64_t identity = 0;
  ZeroMap zero_map;  // pages known to be all zero; empty when unknown
  // TCP, opened for writing: the writer lease the server granted, which
  // every further connection presents. 0 for a reader.
  uint64_t lease = 0;
  // A ticket for one RDMA connect, when the handshake asked for one.
  uint64_t ticket = 0;
};

struct TransportCapabilities {
  uint32_t max_outstanding_reads = 0;  // per channel
  uint32_t max_read_bytes = 0;         // per read
};

// Local memory that reads may land in. On RDMA it carries the memory
// region's lkey; on TCP registration is bookkeeping only.
struct LocalBuffer {
  std::byte* base = nullptr;
  size_t length = 0;
  uint32_t lkey = 0;
};

struct ReadOp {
  uint64_t remote_offset = 0;  // from the start of the region
  uint32_t length = 0;
  std::byte* dst = nullptr;  // inside a registered LocalBuffer
  uint64_t cookie = 0;       // returned in the completion
};

// A write to the region (a memory node; see TransportOptions::writer).
struct WriteOp {
  uint64_t remote_offset = 0;      // from the start of the region
  uint32_t length = 0;             // at most max_read_bytes
  const std::byte* src = nullptr;  // must stay valid until the op completes
  uint64_t cookie = 0;             // returned in the completion
};

// Of a read or a write.
struct ReadCompletion {
  uint64_t cookie = 0;
  Errc status = Errc::kOk;
};

// What one wait() produced. The handler keeps one and reuses its storage.
struct WaitResult {
  std::vector<ReadCompletion> completions;
  std::vector<uint64_t> woken_tokens;  // tokens of watched descriptors that fired
  Errc channel_error = Errc::kOk;      // set when the channel is dead for good
  std::string channel_error_text;
  void clear() {
    completions.clear();
    woken_tokens.clear();
    channel_error = Errc::kOk;
    channel_error_text.clear();
  }
};

// kWrite: a writer's channel for writes (write-back, a snapshot). Over TCP
// it reads as well; over RDMA it carries writes only, on a queue pair of
// its own that alone reaches the writer's staging ring on the node.
enum class ChannelUse { kDemand, kBulk, kWrite };

class Channel {
 public:
  Channel() = default;
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;
  virtual ~Channel() = default;

  virtual LocalBuffer register_buffer(std::byte* base, size_t length) = 0;
  // Makes wait() return `token` whenever `fd` becomes readable. At most
  // one descriptor has WatchRole::kStop:
  // once it is readable (and it stays so), a reconnect in progress ends at
  // once, the channel is dead with kCancelled, its reads outstanding
  // complete with kCancelled, and wait() returns with the stop token among
  // woken_tokens.
  void watch(int fd, uint64_t token, WatchRole role = WatchRole::kWake) { watches_.add(fd, token, role); }
  // While paused, a watched descriptor does not end a wait: a handler with
  // no free staging slot must not spin on a userfaultfd it cannot drain.
  void pause_watch(uint64_t token, bool paused) { watches_.pause(token, paused); }
  // Queues a batch of reads; every op is bounds-checked against the region
  // and ones outside it complete with kOutOfBounds. Never blocks; the batch
  // must fit in the free outstanding slots.
  virtual void post(std::span<const ReadOp> ops) = 0;
  // Queues a batch of writes; they complete through wait() like reads (a
  // caller may mix the two), share the outstanding slots with them and are
  // bounds-checked the same way. On a channel that keeps order (TCP), a read
  // posted after a write reads what it wrote; on RDMA a read posted after a
  // write has completed does. A write is applied once all of it arrived, so
  // a writer that dies mid-write leaves no torn page (a reader of the node
  // may still see a page while a write is being copied in, as it would a
  // page another thread writes). On a channel that may not write (RDMA:
  // any but the writer's kWrite channel) every op completes with kLeased,
  // and where the transport cannot write (local) with kUnsupported.
  virtual void post_writes(std::span<const WriteOp> ops) {
    for (const WriteOp& op : ops) refused_writes_.push_back({op.cookie, Errc::kUnsupported});
  }
  // Submits what was posted and blocks until a completion or a watched
  // descriptor fires (timeout_ms < 0: no limit; 0: do not block).
  virtual void wait(WaitResult& out, int timeout_ms) = 0;
  // Reconnections this channel made after its connection dropped.
  virtual uint64_t reconnects() const { return 0; }

 protected:
  // Moves the completions of writes refused by the default post_writes()
  // into `out`: every wait() that keeps the default calls it first.
  void take_refused_writes(WaitResult& out) {
    out.completions.insert(out.completions.end(), refused_writes_.begin(), refused_writes_.end());
    refused_writes_.clear();
  }

  WatchSet watches_;  // polled by each transport's wait()
  std::vector<ReadCompletion> refused_writes_;
};

// Questions to the source about a live export, whose owner keeps writing
// it (precopy). Each call may block; a dropped connection is reconnected
// once within the reconnect timeout. Both calls are safe to repeat.
class SourceControl {
 public:
  SourceControl() = default;
  SourceControl(const SourceControl&) = delete;
  SourceControl& operator=(const SourceControl&) = delete;
  virtual ~SourceControl() = default;

  struct Written {
    uint64_t epoch = 0;  // the write epoch the source closed to answer
    ZeroMap pages;       // bit = page written after `since`; empty for none asked
    uint64_t count = 0;  // bits set
  };
  // The pages written after epoch `since` (wire::kNoEpoch: only a fresh
  // epoch to ask from later). Throws Error: kUnsupported for an export
  // that is not live, kSourceChanged when the source was written after
  // its pause.
  virtual Written written_since(uint64_t since) = 0;
  // Asks the source's owner to pause its writers; returns once they stand
  // still, with the epoch after the pause.
  virtual uint64_t pause() = 0;
  // After a pause, when the migration failed: the owner's writers go on.
  virtual void resume() = 0;
};

class Transport {
 public:
  Transport() = default;
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;
  virtual ~Transport() = default;

  virtual std::string_view name() const = 0;
  virtual const RegionDescriptor& region() const = 0;
  virtual TransportCapabilities capabilities() const = 0;
  // One per handler thread; the channel is used by that thread alone. A
  // bulk channel carries background transfers (the pull): where the peer
  // can, it serves them behind demand reads. Writes go on a kWrite channel.
  virtual std::unique_ptr<Channel> open_channel(ChannelUse use = ChannelUse::kDemand) = 0;
  // A control connection to a live export (precopy); throws Error
  // (kUnsupported where the transport has none).
  virtual std::unique_ptr<SourceControl> open_control() {
    throw Error(Errc::kUnsupported, std::string(name()) + " transport cannot ask a source which pages it wrote");
  }
};

struct TransportOptions {
  unsigned request_timeout_ms = 10000;
  unsigned reconnect_timeout_ms = 3000;
  // TCP: drive sockets through io_uring. Off, or where the kernel lacks
  // io_uring or an operation it needs, plain syscalls do the same work.
  bool io_uring = true;
  // Open the region for writing as well (a memory node): the transport
  // asks for the region's writer lease and every channel presents it,
  // reconnects included (over RDMA, through a ticket got over TCP). Throws
  // Error(kLeased) while another destination holds it, Error(kUnsupported)
  // for a read-only export.
  bool writer = false;
  // The secret this destination proves to the server, and which the server
  // must prove back (see common/auth.h); null: none, and a server that asks
  // for one refuses this destination with Error(kAuth).
  std::shared_ptr<const AuthKey> key{};
};

// Parses `uri` and connects: tcp://HOST:PORT/NAME. Throws pagewire::Error.
std::unique_ptr<Transport> connect_transport(std::string_view uri, const TransportOptions& t);

// Checks a read against a region: non-empty, within the region, no overflow.
inline bool read_in_bounds(uint64_t region_length, uint64_t offset, uint64_t length) {
  return length > 0 && offset <= region_length && length <= region_length - offset;
}

}  // namespace pagewire
