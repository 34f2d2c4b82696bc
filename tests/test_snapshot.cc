// Live snapshots (pagewire/snapshot.h): memory that threads keep writing is
// saved as it was at one instant, to a file or to a memory node, and the
// image is checked page by page against that instant's contents. Each page
// holds a generation (tools/pattern.h) that names the page and the write,
// so a page from after the instant, a torn page or a misplaced one reads
// wrong. Generation 0 is zeros: pages never written.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "pagewire/snapshot.h"
#include "runtime/uffd.h"
#include "tests/test_util.h"
#include "tools/page_writers.h"
#include "tools/pattern.h"

namespace pagewire {
namespace {

constexpr size_t kPage = 4096;

using Workload = PageWriters;

// Pages of `image` (page i at i * page_size) that are not the generation
// the instant had.
size_t count_wrong(const std::byte* image, const std::vector<uint64_t>& want, size_t page_size) {
  size_t wrong = 0;
  for (size_t p = 0; p < want.size(); ++p) {
    if (!holds_generation(image + p * page_size, p * page_size, page_size, want[p])) ++wrong;
  }
  return wrong;
}

std::vector<std::byte> read_file(const std::string& path) {
  std::vector<std::byte> bytes;
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return bytes;
  const off_t size = ::lseek(fd.get(), 0, SEEK_END);
  bytes.resize(static_cast<size_t>(size));
  if (::pread(fd.get(), bytes.data(), bytes.size(), 0) != size) bytes.clear();
  return bytes;
}

// The range is free again: a new userfaultfd can register it (it could
// not while the snapshot's still did), and a write to every page returns.
void expect_released(std::byte* base, size_t length, size_t page_size) {
  auto writes = std::async(std::launch::async, [&] {
    for (size_t at = 0; at < length; at += page_size) base[at] = std::byte{0x5a};
  });
  ASSERT_EQ(writes.wait_for(std::chrono::seconds(30)), std::future_status::ready) << "a write hangs";
  Userfaultfd again = Userfaultfd::open(0);
  EXPECT_NO_THROW(again.register_range(base, length, false));
}

std::string tmp_path(const std::string& name) {
  return ::testing::TempDir() + "pagewire-snapshot-" + std::to_string(::getpid()) + "-" + name;
}

// A memory node to snapshot to: over RDMA in the guest's binary (where
// PAGEWIRE_RDMA_ADDR names the device's address), over TCP otherwise.
struct Node {
  explicit Node(size_t bytes) : server(options()) { server.export_node("snap", bytes); }
  static std::string rdma_addr() { return testing::guest_rdma_addr(); }
  static ServerOptions options() {
    if (rdma_addr().empty()) return testing::loopback_tcp();
    ServerOptions o;
    o.bind_address = "0.0.0.0";
    o.port = 0;
    o.rdma = RdmaServing::kOn;
    return o;
  }
  std::string uri() const {
    const std::string a = rdma_addr();
    if (a.empty()) return testing::loopback_uri(server, "snap");
    return "rdma://" + a + ":" + std::to_string(server.port()) + "/snap";
  }
  // Every page of the node, read by a second destination.
  std::vector<std::byte> read_back(size_t length) const {
    AttachOptions o = testing::on_demand(2);
    o.background_pull = true;
    Region r = attach(uri(), o);
    EXPECT_TRUE(r.wait_complete(std::chrono::seconds(120)));
    return std::vector<std::byte>(r.data(), r.data() + length);
  }
  MemoryServer server;
};

struct Live {
  Live(size_t pages, size_t cow_pages) : mem(Mapping::anonymous(pages * kPage)) {
    // 4 KiB pages: a transparent huge page would populate the neighbours
    // of a page written, and a page never written would not be missing.
    ::madvise(mem.data(), mem.size(), MADV_NOHUGEPAGE);
    // Three quarters written before; the last quarter never touched, until
    // the writers reach it during the snapshot.
    work = std::make_unique<Workload>(mem.data(), pages, kPage, 2, 0, pages * 3 / 4);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    options.cow_bytes = cow_pages * kPage;
    options.pause = [this] {
      work->pause();
      instant = work->generations();
    };
    options.resume = [this] { work->resume(); };
  }
  Mapping mem;
  std::unique_ptr<Workload> work;
  SnapshotOptions options;
  std::vector<uint64_t> instant;
};

TEST(Snapshot, AFileHoldsTheInstantWhileThreadsKeepWriting) {
  constexpr size_t kPages = 8192;  // 32 MiB
  Live live(kPages, 64);
  const std::string path = tmp_path("file");
  Snapshot s = snapshot(live.mem.data(), kPages * kPage, path, live.options);
  const uint64_t before = live.work->writes();
  ASSERT_TRUE(s.wait(std::chrono::seconds(120)));
  const SnapshotProgress p = s.progress();
  EXPECT_TRUE(p.done);
  EXPECT_FALSE(p.failed) << p.error;
  EXPECT_EQ(p.pages_saved, kPages);
  EXPECT_GT(live.work->writes(), before) << "the writers stood still during the snapshot";
  EXPECT_GT(p.pages_copied, 0u) << "no write met a page before it was saved";
  // Pages never written before the instant are zero there, recorded so
  // (never read), whether or not a writer reached them later.
  const auto never = static_cast<uint64_t>(std::count(live.instant.begin(), live.instant.end(), 0u));
  EXPECT_GT(never, 0u);
  EXPECT_GE(p.pages_zero, never);
  EXPECT_LE(p.cow_max_in_use, 64u);
  live.work->stop();
  const std::vector<std::byte> image = read_file(path);
  ASSERT_EQ(image.size(), kPages * kPage);
  EXPECT_EQ(count_wrong(image.data(), live.instant, kPage), 0u);
  expect_released(live.mem.data(), live.mem.size(), kPage);
  // Restored lazily: the image served as a file, attached, page by page.
  MemoryServer server(testing::loopback_tcp());
  server.export_file("restored", path);
  Region r = attach(testing::loopback_uri(server, "restored"), testing::on_demand(2));
  EXPECT_EQ(count_wrong(r.data(), live.instant, kPage), 0u);
  ::unlink(path.c_str());
}

TEST(Snapshot, AMemoryNodeHoldsTheInstantAndAttachRestoresIt) {
  constexpr size_t kPages = 4096;
  Node node(kPages * kPage);
  Live live(kPages, 16);
  Snapshot s = snapshot(live.mem.data(), kPages * kPage, node.uri(), live.options);
  ASSERT_TRUE(s.wait(std::chrono::seconds(120)));
  const SnapshotProgress p = s.progress();
  EXPECT_FALSE(p.failed) << p.error;
  EXPECT_EQ(p.pages_saved, kPages);
  // A fresh node is zero: zero pages are recorded, not sent.
  EXPECT_EQ(p.bytes_sent, (kPages - p.pages_zero) * kPage);
  live.work->stop();
  expect_released(live.mem.data(), live.mem.size(), kPage);
  const std::vector<std::byte> image = node.read_back(kPages * kPage);
  EXPECT_EQ(count_wrong(image.data(), live.instant, kPage), 0u);
}

// Snapshots `mem` to a file while two threads write it (pages below
// first_unwritten written before), and checks the image against the instant.
void snapshot_to_file_while_written(const Mapping& mem, size_t page_size, size_t first_unwritten, size_t cow_pages,
                                    const std::string& name) {
  const size_t pages = mem.size() / page_size;
  Workload work(mem.data(), pages, page_size, 2, 0, first_unwritten);
  std::vector<uint64_t> instant;
  SnapshotOptions o;
  o.page_size = page_size;
  o.cow_bytes = cow_pages * page_size;
  o.pause = [&] {
    work.pause();
    instant = work.generations();
  };
  o.resume = [&] { work.resume(); };
  const std::string path = tmp_path(name);
  Snapshot s = snapshot(mem.data(), mem.size(), path, o);
  ASSERT_TRUE(s.wait(std::chrono::seconds(120)));
  EXPECT_FALSE(s.progress().failed) << s.progress().error;
  work.stop();
  const std::vector<std::byte> image = read_file(path);
  ASSERT_EQ(image.size(), mem.size());
  EXPECT_EQ(count_wrong(image.data(), instant, page_size), 0u);
  expect_released(mem.data(), mem.size(), page_size);
  ::unlink(path.c_str());
}

TEST(Snapshot, SharedMemoryIsSavedToo) {
  constexpr size_t kPages = 2048;
  UniqueFd fd(static_cast<int>(::memfd_create("pagewire-snapshot", MFD_CLOEXEC)));
  ASSERT_TRUE(fd);
  ASSERT_EQ(::ftruncate(fd.get(), kPages * kPage), 0);
  void* p = ::mmap(nullptr, kPages * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  ASSERT_NE(p, MAP_FAILED);
  snapshot_to_file_while_written(Mapping(p, kPages * kPage), kPage, kPages / 2, 32, "shared");
}

TEST(Snapshot, HugePagesAreSavedToo) {
  constexpr size_t kHuge = 2u << 20;
  constexpr size_t kPages = 8;
  if (const std::string why = testing::reserve_huge_pages(kPages); !why.empty()) GTEST_SKIP() << why;
  void* p = ::mmap(nullptr, kPages * kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
  if (p == MAP_FAILED) GTEST_SKIP() << "no hugetlb mapping: " << std::strerror(errno);
  snapshot_to_file_while_written(Mapping(p, kPages * kHuge), kHuge, kPages, 2, "huge");
}

TEST(SnapshotFailure, ANodeThatDiesFailsTheSnapshotAndTheWorkloadGoesOn) {
  constexpr size_t kPages = 16384;  // 64 MiB: the node dies long before the end
  auto node = std::make_unique<Node>(kPages * kPage);
  Live live(kPages, 4);
  SnapshotOptions o = live.options;
  o.reconnect_timeout_ms = 300;
  Snapshot s = snapshot(live.mem.data(), kPages * kPage, node->uri(), o);
  while (s.progress().pages_saved < 64 && !s.progress().done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  node->server.stop();
  ASSERT_TRUE(s.wait(std::chrono::seconds(60))) << "the snapshot never ended";
  const SnapshotProgress p = s.progress();
  EXPECT_TRUE(p.failed);
  EXPECT_FALSE(p.error.empty());
  EXPECT_LT(p.pages_saved, kPages);
  // The writers went on, and go on.
  const uint64_t writes = live.work->writes();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_GT(live.work->writes(), writes);
  live.work->stop();
  expect_released(live.mem.data(), live.mem.size(), kPage);
}

TEST(SnapshotFailure, CancellingOrDestroyingItWhileWritersWaitReleasesThem) {
  constexpr size_t kPages = 16384;
  for (const bool destroy : {false, true}) {
    Node node(kPages * kPage);
    Live live(kPages, 1);  // one slot: writers wait on it all the time
    auto s = std::make_unique<Snapshot>(snapshot(live.mem.data(), kPages * kPage, node.uri(), live.options));
    while (s->progress().writer_faults < 10 && !s->progress().done) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    auto end = std::async(std::launch::async, [&] {
      if (destroy) {
        s.reset();
      } else {
        s->cancel();
        s->wait();
      }
    });
    ASSERT_EQ(end.wait_for(std::chrono::seconds(30)), std::future_status::ready) << "ending it hangs";
    if (!destroy) {
      EXPECT_TRUE(s->progress().failed);
      EXPECT_NE(s->progress().error.find("cancel"), std::string::npos) << s->progress().error;
    }
    const uint64_t writes = live.work->writes();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_GT(live.work->writes(), writes) << (destroy ? "destroyed" : "cancelled");
    live.work->stop();
    expect_released(live.mem.data(), live.mem.size(), kPage);
  }
}

TEST(SnapshotFailure, AWorkloadThatDiscardsPagesNotYetSavedFailsItWithoutAHang) {
  constexpr size_t kPages = 16384;
  Node node(kPages * kPage);
  Live live(kPages, 64);
  Snapshot s = snapshot(live.mem.data(), kPages * kPage, node.uri(), live.options);
  // The last pages are saved last: discard some of them now.
  auto discard = std::async(std::launch::async, [&] {
    return ::madvise(live.mem.data() + (kPages - 64) * kPage, 64 * kPage, MADV_DONTNEED);
  });
  ASSERT_EQ(discard.wait_for(std::chrono::seconds(30)), std::future_status::ready) << "the discard hangs";
  EXPECT_EQ(discard.get(), 0);
  ASSERT_TRUE(s.wait(std::chrono::seconds(60))) << "the snapshot never ended";
  const SnapshotProgress p = s.progress();
  if (p.pages_saved == kPages && !p.failed) GTEST_SKIP() << "the saver got there first";
  EXPECT_TRUE(p.failed);
  EXPECT_NE(p.error.find("discarded"), std::string::npos) << p.error;
  const uint64_t writes = live.work->writes();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_GT(live.work->writes(), writes);
  live.work->stop();
  expect_released(live.mem.data(), live.mem.size(), kPage);
}

TEST(SnapshotOptions, BadInputIsRefusedAndChangesNothing) {
  Mapping mem = Mapping::anonymous(64 * kPage);
  const std::string path = tmp_path("bad");
  auto refused = [&](void* base, size_t len, const std::string& target, const SnapshotOptions& o, Errc want) {
    try {
      Snapshot s = snapshot(base, len, target, o);
      ADD_FAILURE() << "a bad snapshot was taken";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), want) << e.what();
    }
  };
  SnapshotOptions o;
  refused(mem.data() + 1, kPage, path, o, Errc::kInvalidArgument);
  refused(mem.data(), 0, path, o, Errc::kInvalidArgument);
  refused(mem.data(), kPage + 1, path, o, Errc::kInvalidArgument);
  SnapshotOptions tiny;
  tiny.cow_bytes = 100;
  refused(mem.data(), mem.size(), path, tiny, Errc::kInvalidArgument);
  SnapshotOptions half;
  half.pause = [] {};
  refused(mem.data(), mem.size(), path, half, Errc::kInvalidArgument);
  SnapshotOptions odd;
  odd.page_size = 12345;
  refused(mem.data(), mem.size(), path, odd, Errc::kInvalidArgument);
  refused(mem.data(), mem.size(), "", o, Errc::kInvalidArgument);
  // A node too small for the range.
  Node small(16 * kPage);
  refused(mem.data(), mem.size(), small.uri(), o, Errc::kInvalidArgument);
  // An unwritable path.
  try {
    Snapshot s = snapshot(mem.data(), mem.size(), "/nonexistent-dir/image", o);
    ADD_FAILURE() << "a snapshot into a missing directory";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("nonexistent"), std::string::npos) << e.what();
  }
  expect_released(mem.data(), mem.size(), kPage);
}

}  // namespace
}  // namespace pagewire
