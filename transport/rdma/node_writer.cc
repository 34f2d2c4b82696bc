#include "transport/rdma/node_writer.h"

#include <arpa/inet.h>
#include <fcntl.h>

#include <cstring>

#include "spdlog/spdlog.h"
#include "transport/export_table.h"
#include "transport/transport.h"

namespace pagewire::rdma {
namespace {

constexpr uint64_t kAckTag = uint64_t{1} << 32;  // wr_id of an ack's send; a receive's is its slot

}  // namespace

NodeWriter::NodeWriter(ibv_context* context, const ExportedRegion& region, std::atomic<uint64_t>& applied)
    : region_(region),
      applied_(applied),
      slot_bytes_(kWriteHeaderBytes + std::min(region.page_size, kMaxWritePayload)),
      acks_(kWriteSlots),
      ack_pending_(kWriteSlots, false) {
  pd_.reset(ibv_alloc_pd(context));
  if (!pd_) throw_errno("ibv_alloc_pd for a writer");
  ibv_pd* pd = pd_.get();
  comp_.reset(ibv_create_comp_channel(context));
  if (!comp_) throw_errno("ibv_create_comp_channel");
  ::fcntl(comp_->fd, F_SETFL, ::fcntl(comp_->fd, F_GETFL) | O_NONBLOCK);
  ring_ = Mapping::anonymous(uint64_t{slots_} * slot_bytes_);
  ring_mr_.reset(ibv_reg_mr(pd, ring_.data(), ring_.size(), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE));
  if (!ring_mr_) throw_errno("ibv_reg_mr of a writer's staging ring");
  acks_mr_.reset(ibv_reg_mr(pd, acks_.data(), acks_.size() * sizeof(WriteAck), 0));
  if (!acks_mr_) throw_errno("ibv_reg_mr of a writer's acks");
}

NodeWriter::~NodeWriter() { region_.lease.release(); }

void NodeWriter::describe(HelloReply& reply) const {
  reply.write_ring_addr = reinterpret_cast<uint64_t>(ring_.data());
  reply.write_ring_rkey = ring_mr_->rkey;
  reply.write_slots = static_cast<uint16_t>(slots_);
  reply.write_slot_bytes = slot_bytes_;
}

bool NodeWriter::start(ibv_qp* qp, ibv_cq* cq) {
  qp_ = qp;
  cq_ = cq;
  for (uint32_t s = 0; s < slots_; ++s) {
    if (!post_recv(s)) return false;
  }
  return ibv_req_notify_cq(cq_, 0) == 0;
}

bool NodeWriter::post_recv(uint32_t slot) {
  // A write with immediate consumes a receive but places nothing through
  // it: no scatter list.
  ibv_recv_wr wr{};
  wr.wr_id = slot;
  ibv_recv_wr* bad = nullptr;
  return ibv_post_recv(qp_, &wr, &bad) == 0;
}

Errc NodeWriter::apply(uint32_t slot) {
  const std::byte* at = ring_.data() + uint64_t{slot} * slot_bytes_;
  WriteHeader h{};
  std::memcpy(&h, at, sizeof h);
  if (h.magic != kWriteMagic) return Errc::kProtocol;
  if (h.length == 0 || h.length > slot_bytes_ - kWriteHeaderBytes ||
      !read_in_bounds(region_.length, h.offset, h.length)) {
    return Errc::kOutOfBounds;
  }
  // Marked first: a page written is never offered to the next writer as zero.
  region_.mark_written(h.offset, h.length);
  std::memcpy(region_.writable_base + h.offset, at + kWriteHeaderBytes, h.length);
  applied_.fetch_add(1, std::memory_order_relaxed);
  return Errc::kOk;
}

bool NodeWriter::send_ack(uint32_t slot, Errc status) {
  acks_[slot] = {kWriteMagic, slot, static_cast<uint32_t>(status), 0};
  if (sends_out_ >= send_depth()) {
    unsent_acks_.push_back(slot);  // the status travels in acks_[slot]
    ack_pending_[slot] = true;
    return true;
  }
  ack_pending_[slot] = false;
  ibv_sge sge{reinterpret_cast<uint64_t>(&acks_[slot]), sizeof(WriteAck), acks_mr_->lkey};
  ibv_send_wr wr{};
  wr.wr_id = kAckTag | slot;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  wr.send_flags = IBV_SEND_SIGNALED;
  ibv_send_wr* bad = nullptr;
  if (ibv_post_send(qp_, &wr, &bad) != 0) return false;
  ++sends_out_;
  return true;
}

bool NodeWriter::apply_and_ack(uint32_t slot) {
  if (slot >= slots_ || ack_pending_[slot]) {
    spdlog::warn("server: an RDMA writer of '{}' wrote staging slot {} of {}, which was not its to write; dropping it",
                 region_.name, slot, slots_);
    return false;
  }
  const Errc status = apply(slot);
  if (status != Errc::kOk) {
    spdlog::warn("server: an RDMA writer of '{}' sent a malformed or out-of-bounds write (slot {}); refused",
                 region_.name, slot);
  }
  // The slot's receive goes back before the ack: the writer may reuse the
  // slot as soon as the ack arrives.
  return post_recv(slot) && send_ack(slot, status);
}

bool NodeWriter::on_completions() {
  ibv_cq* cq = nullptr;
  void* ctx = nullptr;
  while (ibv_get_cq_event(comp_.get(), &cq, &ctx) == 0) ibv_ack_cq_events(cq, 1);
  if (broken_) return false;
  if (!drain()) broken_ = true;
  return !broken_;
}

bool NodeWriter::drain() {
  // Arm before polling: a completion between the two is found either way.
  if (ibv_req_notify_cq(cq_, 0) != 0) return false;
  ibv_wc wc[32];
  for (;;) {
    const int n = ibv_poll_cq(cq_, 32, wc);
    if (n < 0) return false;
    for (int i = 0; i < n; ++i) {
      if (wc[i].status != IBV_WC_SUCCESS) {
        if (wc[i].status != IBV_WC_WR_FLUSH_ERR) {
          spdlog::warn("server: an RDMA writer of '{}': {}", region_.name, wc_status(wc[i].status));
        }
        return false;
      }
      if ((wc[i].wr_id & kAckTag) != 0) {
        --sends_out_;
        while (!unsent_acks_.empty() && sends_out_ < send_depth()) {
          const uint32_t slot = unsent_acks_.front();
          unsent_acks_.pop_front();
          if (!send_ack(slot, static_cast<Errc>(acks_[slot].status))) return false;
        }
      } else if (wc[i].opcode == IBV_WC_RECV_RDMA_WITH_IMM) {
        if (!apply_and_ack(ntohl(wc[i].imm_data))) return false;
      } else {
        spdlog::warn("server: an RDMA writer of '{}' sent something other than a write; dropping it", region_.name);
        return false;
      }
    }
    if (n < 32) return true;
  }
}

}  // namespace pagewire::rdma
