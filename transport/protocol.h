// The TCP wire protocol. Little-endian, fixed-size records, some followed
// by a payload whose length they give.
//
//   client -> server  Hello{magic, version, name_len, flags} + name
//                     [+ lease, with kHelloLease] + the client's nonce
//   server -> client  Challenge{magic, flags, the server's nonce, the
//                     server's proof}
//   client -> server  the client's proof
//   server -> client  HelloReply{magic, status, key, page_size, length,
//                     zero_map_bytes} + identity [+ lease, with
//                     kHelloWriter] + the zero-page bitmap
//   client -> server  ReadRequest ...          (any number, pipelined)
//   server -> client  ReadReply + payload ...  (in request order)
//
// A writer (Hello::flags kHelloWriter, to a memory node only; see
// MemoryServer::export_node) also sends writes, mixed with its reads:
//   client -> server  WriteRequest + `length` payload bytes
//   server -> client  ReadReply{status, tag, length 0}  (in request order)
// The server applies a write only once its whole payload has arrived, so a
// connection that drops mid-payload leaves the region as it was. A write to
// a read-only export is refused with kUnsupported, one on a connection
// without the lease with kLeased, one out of bounds with kOutOfBounds.
//
// One writer at a time per region: the first writer hello is granted a
// lease, a random nonzero uint64_t that follows the identity in its OK
// HelloReply (only when kHelloWriter was asked). The same destination's
// further connections, and its reconnects, set kHelloLease as well and send
// that lease (a uint64_t after the name); they are admitted as writers. A
// writer hello from anyone else while the lease is held is refused with
// kLeased. The lease goes when the last connection holding it closes (a
// reconnect presenting it again before another writer came still gets it).
// Readers (no kHelloWriter) may always share a region with its writer.
//
// A control connection (Hello::flags kHelloControl) carries no reads but,
// one at a time, questions about a live export (see ControlRequest):
//   client -> server  ControlRequest
//   server -> client  ControlReply + bitmap of pages written
//
// A reply whose status is not kOk carries no payload; the server then
// closes the connection, so a client never has to resynchronise.
//
// Authentication (see common/auth.h). Each side sends a fresh 32-byte
// nonce; a side that holds the key proves it with an HMAC-SHA-256 over
// both nonces and the hello (server_proof(), client_proof() below); a
// side without one sends zeros, and a server without one says so in the
// challenge (kChallengeKeyed clear). A server with a key checks the
// client's proof before it looks the region up or sends anything about it,
// and answers a wrong one with a HelloReply of status kAuth. A client with
// a key refuses a server that cannot prove it holds the same key.
#pragma once

#include <cstdint>
#include <string_view>

#include "common/auth.h"

namespace pagewire::wire {

inline constexpr uint32_t kHelloMagic = 0x50574831;      // "PWH1"
inline constexpr uint32_t kReadMagic = 0x50575244;       // "PWRD"
inline constexpr uint32_t kReplyMagic = 0x50575250;      // "PWRP"
inline constexpr uint32_t kControlMagic = 0x50574354;    // "PWCT"
inline constexpr uint32_t kWriteMagic = 0x50575752;      // "PWWR"
inline constexpr uint32_t kChallengeMagic = 0x50574155;  // "PWAU"
// 3: the region identity follows an OK HelloReply. 4: control connections.
// 5: writes to memory nodes, the writer lease (kHelloWriter, kHelloLease).
// 6: the challenge and response. 7: tickets for RDMA connects. 8: tickets
// for writers.
inline constexpr uint16_t kVersion = 8;
inline constexpr uint16_t kMaxNameLength = 255;
inline constexpr uint32_t kMaxReadBytes = 4u << 20;

// Hello::flags
inline constexpr uint8_t kHelloBulk = 1;     // background transfer: serve it after demand reads
inline constexpr uint8_t kHelloControl = 2;  // control requests, not reads
inline constexpr uint8_t kHelloWriter = 4;   // asks for the region's writer lease
inline constexpr uint8_t kHelloLease = 8;    // a lease id follows the name (with kHelloWriter)
// Asks for a ticket for an RDMA connect (see transport/tickets.h): the OK
// reply carries it (a uint64_t) after the identity (and the lease) and
// sends no zero-page map, but to a writer; the server then closes the
// connection. With kHelloWriter the ticket names the lease, which stays
// reserved for the RDMA connect (WriterLease::reserve) and is held by it.
inline constexpr uint8_t kHelloTicket = 16;

struct Hello {
  uint32_t magic;
  uint16_t version;
  uint8_t name_length;
  uint8_t flags;
};

// Challenge::flags
inline constexpr uint32_t kChallengeKeyed = 1;  // the server holds a key, and proved it

struct Challenge {
  uint32_t magic;
  uint32_t flags;
  uint8_t nonce[32];
  uint8_t proof[32];  // zeros without kChallengeKeyed
};

struct HelloReply {
  uint32_t magic;
  uint32_t status;  // pagewire::Errc
  uint32_t key;
  uint32_t page_size;
  uint64_t length;
  uint32_t zero_map_bytes;  // bitmap of all-zero pages that follows, bit = page
  uint32_t server_version;  // with status kProtocol: the version the server speaks
};
// With status kOk, a HelloReply is followed by the region's identity (a
// uint64_t; see MemoryServer::export_memory), then, when the hello had
// kHelloWriter, the writer lease (a uint64_t), with kHelloTicket the ticket
// (a uint64_t), and then its zero-page map.

struct ReadRequest {
  uint32_t magic;
  uint32_t key;
  uint64_t offset;
  uint32_t length;
  uint32_t tag;
};

// Followed by `length` payload bytes, written at `offset` once they have all
// arrived; answered by a ReadReply with length 0. The same bounds as a read
// (at most kMaxReadBytes).
struct WriteRequest {
  uint32_t magic;
  uint32_t key;
  uint64_t offset;
  uint32_t length;
  uint32_t tag;
};

struct ReadReply {
  uint32_t magic;
  uint32_t status;  // pagewire::Errc
  uint32_t tag;
  uint32_t length;  // payload bytes that follow
};

// What a control request asks of a live export (one whose owner keeps
// writing, MemoryServer::export_memory with track_writes).
enum class ControlOp : uint32_t {
  // Harvest the pages written since the last harvest, which opens a new
  // write epoch; reply with that epoch and a bitmap of the pages written
  // in the epochs after `epoch` (none when epoch is kNoEpoch).
  kWrittenSince = 1,
  // Ask the owner to pause its writers and return once they stand still;
  // from then on the region must not change (a harvest that finds a write
  // is refused with kSourceChanged). Replies with the epoch after it.
  kPause = 2,
  // A migration that failed after kPause: the owner's writers go on.
  kResume = 3,
};
inline constexpr uint64_t kNoEpoch = ~uint64_t{0};

struct ControlRequest {
  uint32_t magic;
  uint32_t op;  // ControlOp
  uint64_t epoch;
};

struct ControlReply {
  uint32_t magic;
  uint32_t status;  // pagewire::Errc; not kOk: the message follows instead
  uint64_t epoch;
  uint64_t payload_bytes;  // kOk: a bitmap, bit = page; else the error's text
};

static_assert(sizeof(Hello) == 8);
static_assert(sizeof(Challenge) == 72);
static_assert(sizeof(ControlRequest) == 16);
static_assert(sizeof(ControlReply) == 24);
static_assert(sizeof(HelloReply) == 32);
static_assert(sizeof(ReadRequest) == 24);
static_assert(sizeof(ReadReply) == 16);
// The server tells a read from a write by its magic: both headers are one size.
static_assert(sizeof(WriteRequest) == sizeof(ReadRequest));

// What each side's proof covers: both nonces, the region's name and the
// hello's flags (and, from the client, the lease it presents), under
// labels of their own, so that neither proof can stand for the other.
inline Mac server_proof(const AuthKey& key, std::string_view name, uint8_t flags, const Nonce& client,
                        const Nonce& server) {
  return key.mac("pagewire/7 server", {bytes_of(name), bytes_of(flags), client, server});
}
inline Mac client_proof(const AuthKey& key, std::string_view name, uint8_t flags, uint64_t lease, const Nonce& client,
                        const Nonce& server) {
  return key.mac("pagewire/7 client", {bytes_of(name), bytes_of(flags), bytes_of(lease), client, server});
}

}  // namespace pagewire::wire
