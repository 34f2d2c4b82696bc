// Source side: the memory server exports named regions to destinations.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace pagewire {

enum class RdmaServing {
  kAuto,  // serve RDMA too when this machine has an RDMA device
  kOn,    // serve RDMA too, or fail
  kOff,
};

struct ServerOptions {
  std::string bind_address = "0.0.0.0";
  uint16_t port = 7471;            // 0 picks a free port; see MemoryServer::port()
  unsigned max_connections = 256;  // each, TCP and RDMA; more are refused
  // Of those, at most this many from one address (a destination uses one
  // per handler thread, one for the pull and one for a migration's control).
  unsigned max_connections_per_peer = 64;
  // TCP connections that have not yet finished the handshake (said hello
  // and, with a key, proved it): at most this many at once, this many from
  // one address, and each must finish within handshake_timeout_ms of
  // connecting. They have a share of their own: sockets that connect and
  // say nothing never keep a destination out.
  unsigned max_handshakes = 32;
  unsigned max_handshakes_per_peer = 8;
  unsigned handshake_timeout_ms = 3000;
  // A TCP connection past the handshake that sends nothing for this long is
  // closed (a destination reconnects by itself when it next reads); 0:
  // never.
  unsigned idle_timeout_ms = 15 * 60 * 1000;
  // RDMA destinations connect to the same port number (the RDMA port space
  // is separate from TCP's).
  RdmaServing rdma = RdmaServing::kAuto;
  // A file holding the secret that every peer must prove it holds (see
  // the README's "Keys"); empty: the file $PAGEWIRE_KEY_FILE names, if
  // set, else none, and anyone who reaches the port is served.
  std::string key_file{};
};

// How a live export tracks its owner's writes (userfaultfd write-protect).
enum class WriteTracking {
  kAuto,   // asynchronous where the kernel has it (6.7+), else synchronous
  kAsync,  // UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN: writers never stop
  kSync,   // a write fault per page and harvest: works on older kernels
};

struct ExportOptions {
  uint32_t page_size = 4096;
  // Which bytes these are (see export_memory); 0 draws a fresh identity.
  uint64_t identity = 0;
  // The owner keeps writing the memory while it is served (live
  // migration): its writes are tracked, and destinations may ask which
  // pages changed since they last asked. The memory must be the caller's
  // own, writable and mapped (anonymous, shared memory or hugetlb).
  bool track_writes = false;
  WriteTracking tracking = WriteTracking::kAuto;
  // At a migration's switchover: stop the writers and return once they
  // stand still (the serving threads keep running). After it the memory
  // must not change: a destination that finds a write is refused. Without
  // it a destination can only copy a live export, not switch over.
  std::function<void()> pause_writers{};
  // A migration that fails after the pause (the destination says so, if
  // it still can) gives the region back: the writers go on.
  std::function<void()> resume_writers{};
};

struct ServerStats {
  uint64_t connections_accepted = 0;  // TCP
  uint64_t rdma_connections_accepted = 0;
  uint64_t rdma_connections_active = 0;
  uint64_t connections_active = 0;
  uint64_t connections_dropped = 0;  // dropped for a protocol error
  uint64_t reads_served = 0;
  uint64_t bytes_served = 0;
  uint64_t reads_refused = 0;
  uint64_t writes_applied = 0;  // to memory nodes, over TCP and RDMA
  uint64_t bytes_written = 0;
  uint64_t writes_refused = 0;           // out of bounds, read-only, or without the lease
  uint64_t writers_refused = 0;          // writer hellos refused: another held the lease
  uint64_t peers_refused_key = 0;        // peers that did not prove the key
  uint64_t connections_refused = 0;      // over a limit (max_connections, max_handshakes, per peer)
  uint64_t connections_idle_closed = 0;  // idle for idle_timeout_ms
};

class AuthKey;
class ExportTable;
class TicketBook;
class TcpServer;
struct ExportedRegion;
namespace rdma {
class RdmaServer;
}

class MemoryServer {
 public:
  // Binds and starts serving at once; throws std::system_error when the
  // address cannot be bound.
  explicit MemoryServer(const ServerOptions& options = {});
  MemoryServer(const MemoryServer&) = delete;
  MemoryServer& operator=(const MemoryServer&) = delete;
  ~MemoryServer();

  // Region names are what a URI can carry: 1..255 bytes, no '/', space or
  // control character (Error kInvalidArgument otherwise; rdma:// names are
  // at most 40 bytes). Under RdmaServing::kAuto a region that the RDMA
  // device will not register (a memlock limit, say) is served over TCP
  // only, and auto:// destinations fall back to TCP for it.
  //
  // Every export has an identity, which a destination checks when it
  // reconnects, so that a source restarted with other bytes under the same
  // name is refused rather than read into the region.
  //
  // Exports a file, mapped read-only. The file must not shrink while served.
  // Its identity is the file's (device, inode, size, mtime): a server
  // restarted on the same unchanged file serves the same region.
  void export_file(const std::string& name, const std::string& path, uint32_t page_size = 4096);
  // Exports memory the caller owns and keeps alive (and mapped) until stop().
  // identity 0 draws a fresh one, so a restarted owner is another region;
  // give the same nonzero value only for the same bytes (memory filled from
  // the same image, say).
  void export_memory(const std::string& name, const void* base, size_t length, uint32_t page_size = 4096,
                     uint64_t identity = 0);
  // The same, with options: export_memory(name, p, n, {.track_writes = true,
  // .pause_writers = ...}) exports memory whose owner keeps writing.
  void export_memory(const std::string& name, void* base, size_t length, const ExportOptions& options);
  // A memory node: `length` bytes of fresh zeroed memory, allocated and
  // owned by the server, that destinations may write (over TCP; see
  // TransportOptions::writer) as well as read. One destination at a time
  // holds the node's writer lease; readers share it freely. What was written
  // stays after the writer goes, for the next destination to read or
  // write. Its identity is drawn fresh. A write is applied only once all of
  // it has arrived; another destination reading the same page at that very
  // moment may still see part of it (as threads sharing memory would): the
  // writer's own reads are ordered after its writes. Every other export is
  // read-only: a write to it is refused and its connection dropped.
  void export_node(const std::string& name, size_t length, uint32_t page_size = 4096);

  // The owner changed [offset, offset+length) of an exported region: its
  // zero-page map is recomputed there. Destinations that connect later get
  // the new map; one already connected keeps the map it was given, so
  // (as in postcopy) pages must not turn from zero to data while served.
  void mark_changed(const std::string& name, uint64_t offset, uint64_t length);

  uint16_t port() const;
  // True when peers must prove a key (ServerOptions::key_file).
  bool keyed() const;
  // True when RDMA destinations are served as well as TCP ones.
  bool serves_rdma() const;
  ServerStats stats() const;
  // Closes every connection at once (the regions stay exported); a test
  // hook for dropped links.
  void drop_connections();
  void stop();

 private:
  // Exports over TCP, and over RDMA where served (kAuto: TCP only when the
  // device will not take the region).
  // (ExportOptions given: a live export's tracking starts once the device
  // has registered the memory; TCP destinations and control connections
  // find it only then. An RDMA destination that connects in between reads
  // pages, but its questions about written pages wait for TCP to find it.)
  void add(std::unique_ptr<ExportedRegion> region, const ExportOptions* live = nullptr);

  std::shared_ptr<const AuthKey> key_;    // null: serves anyone
  std::unique_ptr<TicketBook> tickets_;   // for RDMA connects, issued over TCP
  std::unique_ptr<ExportTable> exports_;  // first: outlives the servers that read it
  std::unique_ptr<TcpServer> tcp_;
  std::unique_ptr<rdma::RdmaServer> rdma_;  // null when not serving RDMA; stopped first
  RdmaServing rdma_mode_;
};

}  // namespace pagewire
