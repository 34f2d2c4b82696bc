// Move-only owners for rdma-core objects, and the small helpers the RDMA
// client and server share. Each owner frees its object with the matching
// ibv_/rdma_ call; declare them in creation order so that they are
// destroyed QP before CQ before MR before PD.
#pragma once

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include <cstdint>
#include <memory>
#include <string>

#include "pagewire/error.h"

namespace pagewire::rdma {

struct PdDeleter {
  void operator()(ibv_pd* p) const { ibv_dealloc_pd(p); }
};
struct MrDeleter {
  void operator()(ibv_mr* p) const { ibv_dereg_mr(p); }
};
struct CqDeleter {
  void operator()(ibv_cq* p) const { ibv_destroy_cq(p); }
};
struct CompChannelDeleter {
  void operator()(ibv_comp_channel* p) const { ibv_destroy_comp_channel(p); }
};
struct EventChannelDeleter {
  void operator()(rdma_event_channel* p) const { rdma_destroy_event_channel(p); }
};
// A cm id with the QP created on it: the QP goes first.
struct CmIdDeleter {
  void operator()(rdma_cm_id* id) const {
    if (id->qp != nullptr) rdma_destroy_qp(id);
    rdma_destroy_id(id);
  }
};

using Pd = std::unique_ptr<ibv_pd, PdDeleter>;
using Mr = std::unique_ptr<ibv_mr, MrDeleter>;
using Cq = std::unique_ptr<ibv_cq, CqDeleter>;
using CompChannel = std::unique_ptr<ibv_comp_channel, CompChannelDeleter>;
using EventChannel = std::unique_ptr<rdma_event_channel, EventChannelDeleter>;
using CmId = std::unique_ptr<rdma_cm_id, CmIdDeleter>;

// The private data of the connection handshake. A REQ carries at most 56
// bytes of it, an accept or a reject 148 or more.
inline constexpr uint32_t kHelloMagic = 0x50575248;  // "PWRH"
inline constexpr size_t kMaxRdmaName = 40;

// 2: the reply carries the region identity. 3: a ticket (for a keyed
// server; transport/tickets.h), names of at most 40 bytes. 4: writers of a
// memory node (kRdmaWriter) and their staging ring.
inline constexpr uint16_t kRdmaVersion = 4;

// Hello::flags
inline constexpr uint8_t kRdmaTicket = 1;  // `ticket` holds one, got over TCP by proving the key
// The connection writes the region (a memory node). Its ticket, which it
// must bring keyed or not, was issued to the holder of the node's writer
// lease and names that lease: the 56 bytes have no room for the lease
// itself, and a ticket is good once.
inline constexpr uint8_t kRdmaWriter = 2;

struct Hello {
  uint32_t magic;
  uint16_t version;
  uint8_t name_length;
  uint8_t flags;
  uint64_t ticket;
  char name[kMaxRdmaName];
};
static_assert(sizeof(Hello) <= 56);

struct HelloReply {
  uint32_t magic;
  uint32_t status;  // pagewire::Errc
  uint32_t rkey;
  uint32_t page_size;
  uint64_t length;
  uint64_t remote_addr;
  // The zero-page bitmap, registered for remote read: the destination
  // fetches it with one RDMA READ when it connects.
  uint64_t zero_map_addr;
  uint32_t zero_map_rkey;
  uint32_t zero_map_bytes;
  uint64_t identity;  // see MemoryServer::export_memory
  // A writer's staging ring (kRdmaWriter; zeros otherwise): write_slots
  // slots of write_slot_bytes, registered for remote write on this
  // connection alone. See WriteHeader.
  uint64_t write_ring_addr;
  uint32_t write_ring_rkey;
  uint16_t write_slots;
  uint16_t reserved;
  uint32_t write_slot_bytes;  // a WriteHeader, then the payload
  uint32_t reserved2;
};

// Writes to a memory node. The region itself is never remotely writable:
// an RDMA WRITE that stops half way (a destination that dies, a link that
// drops) would leave a torn page where readers see it. A writer instead
// RDMA WRITEs a WriteHeader and the payload into a free slot of its own
// staging ring, as one RDMA WRITE WITH IMMEDIATE whose immediate is the
// slot's index. The server sees it only once every byte has arrived,
// copies the payload into the region and SENDs a WriteAck; the slot is
// the writer's again once the ack is in. So a page lands whole or not at
// all, and an acknowledged write is in the region, where a read after the
// ack finds it.
inline constexpr uint32_t kWriteMagic = 0x50575257;  // "PWRW"
inline constexpr uint32_t kWriteSlots = 64;        // at most, granted by the server; a writer posts that many receives
inline constexpr uint32_t kWriteHeaderBytes = 64;  // the payload starts a cache line in
inline constexpr uint32_t kMaxWritePayload = 64u << 10;

struct WriteHeader {
  uint32_t magic;
  uint32_t length;  // payload bytes, at most write_slot_bytes - kWriteHeaderBytes
  uint64_t offset;  // in the region
};

struct WriteAck {
  uint32_t magic;
  uint32_t slot;
  uint32_t status;  // pagewire::Errc
  uint32_t reserved;
};

static_assert(sizeof(HelloReply) <= 148);

// Creates an event channel whose fd is non-blocking, so waits can time out.
EventChannel make_event_channel();

// Waits for the next cm event on `ec` for at most timeout_ms; nullptr on
// timeout. The caller acks the event.
rdma_cm_event* next_event(rdma_event_channel* ec, int timeout_ms);

// True when this machine has at least one RDMA device.
bool have_device();

const char* wc_status(ibv_wc_status s);

}  // namespace pagewire::rdma
