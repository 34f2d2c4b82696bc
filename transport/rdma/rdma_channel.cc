#include "transport/rdma/rdma_channel.h"

#include <arpa/inet.h>
#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/unique_fd.h"
#include "spdlog/spdlog.h"

namespace pagewire::rdma {

int post_ack_receive(ibv_qp* qp, WriteRing& ring, uint32_t index) {
  ibv_sge sge{reinterpret_cast<uint64_t>(&ring.acks[index]), sizeof(WriteAck), ring.acks_mr->lkey};
  ibv_recv_wr wr{};
  wr.wr_id = index;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_recv_wr* bad = nullptr;
  return ibv_post_recv(qp, &wr, &bad);
}

std::shared_ptr<ibv_mr> MrCache::get(std::byte* base, size_t length) {
  std::lock_guard lock(mu_);
  std::erase_if(mrs_, [](const std::weak_ptr<ibv_mr>& w) { return w.expired(); });
  for (const auto& w : mrs_) {
    if (auto mr = w.lock(); mr && mr->addr == base && mr->length == length) return mr;
  }
  ibv_mr* mr = ibv_reg_mr(pd_, base, length, IBV_ACCESS_LOCAL_WRITE);
  if (mr == nullptr) {
    throw_errno("ibv_reg_mr of " + std::to_string(length) +
                " bytes (staging buffers, or a shared-memory region's alias; registration pins them and counts "
                "against RLIMIT_MEMLOCK: see ulimit -l)");
  }
  std::shared_ptr<ibv_mr> owned(mr, [](ibv_mr* m) { ibv_dereg_mr(m); });
  mrs_.push_back(owned);
  return owned;
}

RdmaChannel::RdmaChannel(Connection conn, Connector connect, std::shared_ptr<MrCache> mrs, RegionDescriptor desc,
                         TransportOptions options)
    : connect_(std::move(connect)),
      cache_(std::move(mrs)),
      desc_(std::move(desc)),
      options_(options),
      conn_(std::move(conn)),
      fifo_(conn_.depth) {
  wrs_.resize(conn_.depth);
  sges_.resize(2 * size_t{conn_.depth});  // a write sends its header and its payload
  local_.reserve(conn_.depth);
  writer_ = conn_.ring != nullptr;
  if (writer_) {
    write_payload_ = conn_.ring->slot_bytes - kWriteHeaderBytes;
    slots_.resize(conn_.ring->slots);
    for (uint32_t s = conn_.ring->slots; s > 0; --s) free_slots_.push_back(s - 1);
  }
}

RdmaChannel::~RdmaChannel() { teardown(); }

void RdmaChannel::teardown() {
  if (conn_.id) rdma_disconnect(conn_.id.get());
  if (unacked_cq_events_ > 0 && conn_.cq) ibv_ack_cq_events(conn_.cq.get(), unacked_cq_events_);
  unacked_cq_events_ = 0;
  // The QP first: once it is destroyed no read of it writes our memory.
  conn_.id.reset();
  conn_.ring.reset();
  ++generation_;  // completions polled from the old queue pair are void
  conn_.cq.reset();
  conn_.comp.reset();
  conn_.events.reset();
}

LocalBuffer RdmaChannel::register_buffer(std::byte* base, size_t length) {
  std::shared_ptr<ibv_mr> mr = cache_->get(base, length);
  mrs_.push_back(mr);
  return {base, length, mr->lkey};
}

uint32_t RdmaChannel::lkey_for(const std::byte* p) const {
  for (const auto& mr : mrs_) {
    const auto* b = static_cast<const std::byte*>(mr->addr);
    if (p >= b && p < b + mr->length) return mr->lkey;
  }
  return 0;
}

void RdmaChannel::post(std::span<const ReadOp> ops) {
  const size_t cap = fifo_.size();
  const bool was_idle = !busy();
  size_t n = 0;
  for (const ReadOp& op : ops) {
    if (!read_in_bounds(desc_.length, op.remote_offset, op.length)) {
      local_.push_back({op.cookie, Errc::kOutOfBounds});
      continue;
    }
    const uint32_t lkey = lkey_for(op.dst);
    if (writer_ || dead_ != Errc::kOk || lkey == 0 || posted_ + n >= cap) {
      // (A writer's queue pair reaches only its staging ring on the node.)
      local_.push_back({op.cookie, writer_ ? Errc::kUnsupported : dead_ != Errc::kOk ? dead_ : Errc::kInvalidArgument});
      continue;
    }
    fifo_[(fifo_head_ + posted_ + n) % cap] = {op, lkey, false};
    ++n;
  }
  if (n > 0 && was_idle) last_progress_ = last_completion_ = std::chrono::steady_clock::now();
  submit(n);
}

void RdmaChannel::post_writes(std::span<const WriteOp> ops) {
  const bool was_idle = !busy();
  for (const WriteOp& op : ops) {
    Errc refuse = Errc::kOk;
    if (!writer_) {
      refuse = Errc::kLeased;  // opened without the node's writer lease
    } else if (!read_in_bounds(desc_.length, op.remote_offset, op.length)) {
      refuse = Errc::kOutOfBounds;
    } else if (dead_ != Errc::kOk) {
      refuse = dead_;
    } else if (op.length == 0 || op.length > write_payload_ || lkey_for(op.src) == 0) {
      refuse = Errc::kInvalidArgument;
    }
    if (refuse != Errc::kOk) {
      local_.push_back({op.cookie, refuse});
    } else {
      backlog_.push_back(op);
    }
  }
  if (was_idle && busy()) last_progress_ = last_completion_ = std::chrono::steady_clock::now();
  post_backlog();
}

void RdmaChannel::post_backlog() {
  const size_t cap = fifo_.size();
  size_t n = 0;
  while (dead_ == Errc::kOk && !backlog_.empty() && !free_slots_.empty() && posted_ + n < cap) {
    const uint32_t slot = free_slots_.back();
    free_slots_.pop_back();
    const WriteOp& op = backlog_.front();
    slots_[slot] = {op, lkey_for(op.src), ++write_seq_, true};
    backlog_.pop_front();
    ++writes_out_;
    fifo_[(fifo_head_ + posted_ + n) % cap] = {ReadOp{}, slots_[slot].lkey, false, static_cast<int32_t>(slot)};
    ++n;
  }
  submit(n);
}

void RdmaChannel::submit(size_t n) {
  if (n == 0) return;
  const size_t cap = fifo_.size();
  for (size_t i = 0; i < n; ++i) {
    // Signal the batch's last request, and one in every kSignalEvery.
    const bool signalled = i + 1 == n || ++unsignalled_ >= kSignalEvery;
    if (signalled) unsignalled_ = 0;
    fifo_[(fifo_head_ + posted_ + i) % cap].signalled = signalled;
  }
  size_t accepted = 0;
  const int rc = post_fifo(fifo_head_ + posted_, n, &accepted);
  posted_ += n;
  if (rc != 0) {
    // Only a prefix went out, and it may end unsignalled, so its completion
    // would never come: the queue pair is not to be trusted any more. A new
    // one takes every request.
    WaitResult failed;
    recover(Errc::kIo, std::string("ibv_post_send: ") + std::strerror(rc), failed);
    local_.insert(local_.end(), failed.completions.begin(), failed.completions.end());
  }
}

int RdmaChannel::post_fifo(uint64_t from, size_t n, size_t* accepted) {
  *accepted = 0;
  if (n == 0) return 0;
  const size_t cap = fifo_.size();
  for (size_t i = 0; i < n; ++i) {
    const Posted& p = fifo_[(from + i) % cap];
    ibv_send_wr& wr = wrs_[i];
    wr = {};
    wr.sg_list = &sges_[2 * i];
    wr.send_flags = p.signalled ? IBV_SEND_SIGNALED : 0;
    if (p.slot < 0) {
      sges_[2 * i] = {reinterpret_cast<uint64_t>(p.op.dst), p.op.length, p.lkey};
      wr.wr_id = p.op.cookie;
      wr.num_sge = 1;
      wr.opcode = IBV_WR_RDMA_READ;
      wr.wr.rdma.remote_addr = desc_.remote_addr + p.op.remote_offset;
      wr.wr.rdma.rkey = desc_.key;
    } else {
      // Header and payload land in the slot as one message; the immediate
      // tells the node which slot is complete.
      const auto slot = static_cast<uint32_t>(p.slot);
      const WriteOp& op = slots_[slot].op;
      WriteRing& ring = *conn_.ring;
      std::byte* header = ring.headers.data() + size_t{slot} * kWriteHeaderBytes;
      const WriteHeader h{kWriteMagic, op.length, op.remote_offset};
      std::memcpy(header, &h, sizeof h);
      sges_[2 * i] = {reinterpret_cast<uint64_t>(header), kWriteHeaderBytes, ring.headers_mr->lkey};
      sges_[2 * i + 1] = {reinterpret_cast<uint64_t>(op.src), op.length, p.lkey};
      wr.wr_id = op.cookie;
      wr.num_sge = 2;
      wr.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
      wr.imm_data = htonl(slot);
      wr.wr.rdma.remote_addr = ring.remote_addr + uint64_t{slot} * ring.slot_bytes;
      wr.wr.rdma.rkey = ring.rkey;
    }
    if (i > 0) wrs_[i - 1].next = &wr;
  }
  ibv_send_wr* bad = nullptr;
  const int rc = ibv_post_send(conn_.id->qp, &wrs_[0], &bad);  // one doorbell for the batch
  if (rc == 0) {
    *accepted = n;
  } else {
    for (ibv_send_wr* w = &wrs_[0]; w != bad && w != nullptr; w = w->next) ++*accepted;
  }
  return rc;
}

void RdmaChannel::on_ack(uint64_t index, WaitResult& out) {
  WriteRing* ring = conn_.ring.get();
  if (!writer_ || ring == nullptr || index >= ring->slots) {
    fail(Errc::kProtocol, "the node sent a message this channel did not ask for", out);
    return;
  }
  const WriteAck ack = ring->acks[index];
  if (ack.magic != kWriteMagic || ack.slot >= slots_.size() || !slots_[ack.slot].busy) {
    fail(Errc::kProtocol, "the node acknowledged a write it was not sent", out);
    return;
  }
  SlotWrite& w = slots_[ack.slot];
  w.busy = false;
  free_slots_.push_back(ack.slot);
  --writes_out_;
  out.completions.push_back({w.op.cookie, static_cast<Errc>(ack.status)});
  last_progress_ = last_completion_ = std::chrono::steady_clock::now();
  // The buffer takes the next ack: the node never has more out than slots.
  if (const int rc = post_ack_receive(conn_.id->qp, *ring, static_cast<uint32_t>(index)); rc != 0) {
    recover(Errc::kIo, std::string("ibv_post_recv: ") + std::strerror(rc), out);
  }
}

void RdmaChannel::drain_cq(WaitResult& out) {
  ibv_wc wc[32];
  const uint64_t generation = generation_;
  while (dead_ == Errc::kOk && generation_ == generation) {
    const int n = ibv_poll_cq(conn_.cq.get(), 32, wc);
    if (n < 0) {
      recover(Errc::kIo, "ibv_poll_cq failed", out);
      return;
    }
    for (int i = 0; i < n; ++i) {
      if (wc[i].status != IBV_WC_SUCCESS) {
        // The rest of wc[] is of the queue pair recover() destroys.
        recover(Errc::kIo, std::string("an RDMA request completed with ") + wc_status(wc[i].status), out);
        return;
      }
      if ((wc[i].opcode & IBV_WC_RECV) != 0) {
        on_ack(wc[i].wr_id, out);
        if (dead_ != Errc::kOk || generation_ != generation) return;  // the rest is the old queue pair's
        continue;
      }
      // In-order completion: everything up to this signalled request is
      // done. A write is done only once the node acks it.
      while (posted_ > 0) {
        const Posted& p = fifo_[fifo_head_ % fifo_.size()];
        ++fifo_head_;
        --posted_;
        if (p.slot < 0) out.completions.push_back({p.op.cookie, Errc::kOk});
        if (p.signalled) break;
      }
      last_progress_ = last_completion_ = std::chrono::steady_clock::now();
    }
    if (n < 32) return;
  }
}

void RdmaChannel::recover(Errc why, const std::string& text, WaitResult& out) {
  if (dead_ != Errc::kOk) return;
  spdlog::warn("rdma: {} ({} requests, {} writes outstanding); reconnecting", text, posted_,
               writes_out_ + backlog_.size());
  teardown();
  std::string last_why = text;
  // A source that takes connections but never completes a read would have
  // us reconnect forever: past one request timeout plus one reconnect
  // timeout with reads out and none completed, it is dead.
  const bool stalled = busy() &&
                       std::chrono::steady_clock::now() - last_completion_ >
                           std::chrono::milliseconds(options_.request_timeout_ms + options_.reconnect_timeout_ms);
  ReconnectEnd end = ReconnectEnd::kGaveUp;
  if (stalled) {
    last_why = "no read completed since the last reconnect";
  } else {
    // A connect attempt is bounded by its own setup timeout, not by the
    // time left: the stop is seen between attempts.
    end = reconnect(options_.reconnect_timeout_ms, watches_, &last_why,
                    [this](unsigned, std::string* why_not) { return try_reconnect(why_not); });
  }
  if (end == ReconnectEnd::kConnected) {
    ++reconnects_;
    last_progress_ = std::chrono::steady_clock::now();
    spdlog::info("rdma: reconnected; posted {} requests again", posted_);
    return;
  }
  if (end == ReconnectEnd::kStopped) {
    // The engine is going away: it reads no more from this channel.
    fail(Errc::kCancelled, text + "; stopped while reconnecting", out);
    watches_.report_stop(out.woken_tokens);
    return;
  }
  fail(why, text + "; reconnect failed: " + last_why, out);
}

size_t RdmaChannel::requeue_for_new_queue_pair() {
  // The reads still outstanding, in their order, then every write the node
  // has not acked, in theirs. A write it applied but whose ack was lost is
  // applied again: the same bytes where they already are.
  std::vector<Posted> again;
  for (uint64_t k = 0; k < posted_; ++k) {
    const Posted& p = fifo_[(fifo_head_ + k) % fifo_.size()];
    if (p.slot < 0) again.push_back(p);
  }
  std::vector<uint32_t> writes;
  for (uint32_t s = 0; s < slots_.size(); ++s) {
    if (slots_[s].busy) writes.push_back(s);
  }
  std::sort(writes.begin(), writes.end(), [this](uint32_t a, uint32_t b) { return slots_[a].seq < slots_[b].seq; });
  for (uint32_t s : writes) again.push_back({ReadOp{}, slots_[s].lkey, false, static_cast<int32_t>(s)});
  if (again.size() > fifo_.size()) return again.size();
  fifo_head_ = 0;
  posted_ = again.size();
  unsignalled_ = 0;
  for (size_t i = 0; i < again.size(); ++i) {
    again[i].signalled = i + 1 == again.size() || (i + 1) % kSignalEvery == 0;
    fifo_[i] = again[i];
  }
  return again.size();
}

ReconnectAttempt RdmaChannel::try_reconnect(std::string* why) {
  try {
    Connection c = connect_();
    if (c.reply.length != desc_.length || c.reply.page_size != desc_.page_size || c.reply.identity != desc_.identity) {
      *why = c.reply.identity != desc_.identity
                 ? "the source now serves other bytes as '" + desc_.name + "' (it was restarted)"
                 : "region '" + desc_.name + "' changed shape";
      conn_ = std::move(c);
      teardown();
      return ReconnectAttempt::kGiveUp;  // never read a different region into these pages
    }
    conn_ = std::move(c);
    desc_.key = conn_.reply.rkey;
    desc_.remote_addr = conn_.reply.remote_addr;
    if (writer_ && (!conn_.ring || conn_.ring->slots != slots_.size() ||
                    conn_.ring->slot_bytes - kWriteHeaderBytes != write_payload_)) {
      *why = "the node no longer grants this writer its staging slots";
      teardown();
      return ReconnectAttempt::kGiveUp;
    }
    const size_t n = requeue_for_new_queue_pair();
    if (conn_.depth < n || fifo_.size() < n) {
      *why = "the new queue pair is too small for the requests outstanding";
      teardown();
      return ReconnectAttempt::kGiveUp;
    }
    size_t accepted = 0;
    if (const int rc = post_fifo(fifo_head_, posted_, &accepted); rc != 0) {
      *why = std::string("ibv_post_send on the new queue pair: ") + std::strerror(rc);
      teardown();
      return ReconnectAttempt::kRetry;
    }
    return ReconnectAttempt::kConnected;
  } catch (const std::exception& e) {
    // Not found is tried again too: a restarted source listens a moment
    // before it exports its regions.
    *why = e.what();
    return ReconnectAttempt::kRetry;
  }
}

void RdmaChannel::fail(Errc why, const std::string& text, WaitResult& out) {
  if (dead_ != Errc::kOk) return;
  dead_ = why;
  dead_text_ = text;
  if (why == Errc::kCancelled) {
    spdlog::info("rdma: {} ({} requests outstanding)", text, posted_);
  } else {
    spdlog::error("rdma: {} ({} requests, {} writes outstanding); this connection is dead", text, posted_,
                  writes_out_ + backlog_.size());
  }
  teardown();  // no read lands in memory given back as failed
  for (; posted_ > 0; --posted_, ++fifo_head_) {
    const Posted& p = fifo_[fifo_head_ % fifo_.size()];
    if (p.slot < 0) out.completions.push_back({p.op.cookie, why});
  }
  for (uint32_t s = 0; s < slots_.size(); ++s) {
    if (!slots_[s].busy) continue;
    slots_[s].busy = false;
    free_slots_.push_back(s);
    out.completions.push_back({slots_[s].op.cookie, why});
  }
  writes_out_ = 0;
  for (const WriteOp& op : backlog_) out.completions.push_back({op.cookie, why});
  backlog_.clear();
}

void RdmaChannel::take_local(WaitResult& out) {
  out.completions.insert(out.completions.end(), local_.begin(), local_.end());
  local_.clear();
}

void RdmaChannel::wait(WaitResult& out, int timeout_ms) {
  // Whatever completes here is reported at once, failed reads included: a
  // reconnect that fails in drain_cq fails every read outstanding, and a
  // blocking wait after it would sit on them until something else woke it.
  const size_t had = out.completions.size();
  out.completions.insert(out.completions.end(), local_.begin(), local_.end());
  local_.clear();
  take_refused_writes(out);
  drain_cq(out);
  if (out.completions.size() == had && timeout_ms != 0 && busy() && dead_ == Errc::kOk) {
    // Arm, then look again: a completion between the two would be missed.
    ibv_req_notify_cq(conn_.cq.get(), 0);
    drain_cq(out);
  }
  post_backlog();   // into the slots acks freed
  take_local(out);  // and what failed doing so
  if (out.completions.size() > had) timeout_ms = 0;
  int effective = timeout_ms;
  if (busy() && dead_ == Errc::kOk) {
    const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                              last_progress_);
    const int left = static_cast<int>(std::max<int64_t>(options_.request_timeout_ms - waited.count(), 0));
    effective = effective < 0 ? left : std::min(effective, left);
  }
  // A dead channel has no queue pair left: it waits on the watches alone.
  const bool live = dead_ == Errc::kOk;
  pollfd own[2] = {{live ? conn_.comp->fd : -1, POLLIN, 0}, {live ? conn_.events->fd : -1, POLLIN, 0}};
  const int rc = watches_.poll(own, effective, out.woken_tokens);
  if (rc > 0) {
    if (own[0].revents != 0) {
      ibv_cq* cq = nullptr;
      void* ctx = nullptr;
      while (ibv_get_cq_event(conn_.comp.get(), &cq, &ctx) == 0) ++unacked_cq_events_;
      if (unacked_cq_events_ >= 64) {
        ibv_ack_cq_events(conn_.cq.get(), unacked_cq_events_);
        unacked_cq_events_ = 0;
      }
      drain_cq(out);  // may find the queue pair broken and replace it
      post_backlog();
      take_local(out);
    }
    // The cm events of the connection polled, if recovery has not replaced it.
    if (own[1].revents != 0 && dead_ == Errc::kOk && conn_.events && conn_.events->fd == own[1].fd) {
      rdma_cm_event* ev = nullptr;
      while (dead_ == Errc::kOk && rdma_get_cm_event(conn_.events.get(), &ev) == 0) {
        const rdma_cm_event_type type = ev->event;
        rdma_ack_cm_event(ev);
        if (type == RDMA_CM_EVENT_DISCONNECTED || type == RDMA_CM_EVENT_DEVICE_REMOVAL) {
          drain_cq(out);  // what completed before the peer left still counts
          recover(Errc::kClosed, std::string("the source ") + rdma_event_str(type), out);
          break;
        }
      }
    }
  }
  if (busy() && dead_ == Errc::kOk &&
      std::chrono::steady_clock::now() - last_progress_ >= std::chrono::milliseconds(options_.request_timeout_ms)) {
    recover(Errc::kTimeout, "no RDMA completion within " + std::to_string(options_.request_timeout_ms) + " ms", out);
  }
  if (dead_ != Errc::kOk) {
    out.channel_error = dead_;
    out.channel_error_text = dead_text_;
  }
}

}  // namespace pagewire::rdma
