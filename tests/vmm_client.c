/* A stand-in for a VMM, written against the page-fault handler protocol
 * alone (Firecracker's): it maps guest memory, creates and registers the
 * userfaultfd, sends the handshake (a JSON array of mappings, the
 * userfaultfd as SCM_RIGHTS; with --shared, guest memory is a memfd mapped
 * shared, registered for minor faults, and the memfd goes with it) to
 * `pagewire handler`, then touches its memory
 * from several threads and through the kernel, checking every byte against
 * the source's bytes (--expect, the file the source serves).
 *
 * Exit status: 0 every check passed; 1 a byte differs; 2 a setup step
 * failed; 3 a check of a kernel access failed; 4 the handler did not close
 * a refused handshake's connection. Each failure prints one line saying
 * what. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif
#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << MAP_HUGE_SHIFT)
#endif

struct mapping {
  unsigned char* base;
  size_t size;
  size_t offset; /* in the source */
};

static struct {
  const char* socket_path;
  const char* expect_path;
  const char* dir; /* for the kernel-access files */
  const char* bad;
  size_t page;
  int mappings;
  int threads;
  long exit_after;
  int kernel;
  int remove;
  int legacy_page_size; /* send page_size_kib only */
  int shared;           /* guest memory is a memfd, mapped shared at the source offsets */
  long pause_ms;        /* after the handshake, before any page is touched */
} opt = {.page = 4096, .mappings = 2, .threads = 4, .exit_after = -1, .dir = "."};

static unsigned char* expect; /* the source's bytes; pages the kernel wrote into are rewritten here */
static size_t expect_size;
static struct mapping maps[16];
static atomic_long touched;
static int memfd = -1;

static void die(int code, const char* what) {
  fprintf(stderr, "vmm_client: %s%s%s\n", what, errno ? ": " : "", errno ? strerror(errno) : "");
  exit(code);
}

/* Where source offset `off` is in this process's memory. */
static unsigned char* at(size_t off) {
  for (int i = 0; i < opt.mappings; ++i) {
    if (off >= maps[i].offset && off < maps[i].offset + maps[i].size) return maps[i].base + (off - maps[i].offset);
  }
  return NULL;
}

static void check_page(size_t off, const char* how) {
  const unsigned char* p = at(off);
  if (memcmp(p, expect + off, opt.page) != 0) {
    size_t i = 0;
    while (p[i] == expect[off + i]) ++i;
    fprintf(stderr, "vmm_client: %s: byte %zu of the page at source offset %zu is %u, the source has %u\n", how, i,
            off, p[i], expect[off + i]);
    exit(1);
  }
}

static void* toucher(void* arg) {
  const long t = (long)arg;
  const size_t pages = expect_size / opt.page;
  /* Every thread visits its own pages in a scattered order. */
  const size_t step = 7919 % pages == 0 ? 1 : 7919;
  for (size_t k = 0; k < pages; ++k) {
    const size_t pg = (k * step) % pages;
    if ((long)(pg % (size_t)opt.threads) != t) continue;
    check_page(pg * opt.page, "a thread's read");
    const long n = atomic_fetch_add(&touched, 1) + 1;
    if (opt.exit_after >= 0 && n >= opt.exit_after) _exit(0); /* mid-run, the other threads still faulting */
  }
  return NULL;
}

static int make_uffd(void) {
  int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) die(2, "userfaultfd");
  struct uffdio_api api = {.api = UFFD_API, .features = opt.remove ? UFFD_FEATURE_EVENT_REMOVE : 0};
  if (opt.shared) api.features |= opt.page > 4096 ? UFFD_FEATURE_MINOR_HUGETLBFS : UFFD_FEATURE_MINOR_SHMEM;
  if (ioctl(fd, UFFDIO_API, &api) != 0) die(2, "UFFDIO_API");
  return fd;
}

static void map_memory(int uffd) {
  const size_t per = expect_size / (size_t)opt.mappings;
  if (per % opt.page != 0 || per == 0) die(2, "the source does not split into whole pages per mapping");
  if (opt.shared) {
    memfd = memfd_create("guest", MFD_CLOEXEC | MFD_ALLOW_SEALING | (opt.page > 4096 ? MFD_HUGETLB | MFD_HUGE_2MB : 0));
    if (memfd < 0 || ftruncate(memfd, (off_t)expect_size) != 0) die(2, "memfd_create of guest memory");
    /* Its size fixed, as the handler asks (Firecracker seals it so too). */
    const int unsealed = opt.bad && strcmp(opt.bad, "memfd-unsealed") == 0;
    if (!unsealed && fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) die(2, "sealing the memfd");
  }
  for (int i = 0; i < opt.mappings; ++i) {
    /* Mapped in reverse source order, a page apart: no mapping follows
     * another in memory as it does in the source. */
    const int src = opt.mappings - 1 - i;
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | (opt.page > 4096 ? MAP_HUGETLB | MAP_HUGE_2MB : 0);
    unsigned char* p = mmap(NULL, per + opt.page, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) die(2, "mmap of guest memory");
    munmap(p + per, opt.page);
    if (opt.shared && mmap(p, per, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, memfd, (off_t)src * (off_t)per) != p) {
      die(2, "mmap of the guest memfd");
    }
    maps[src] = (struct mapping){p, per, (size_t)src * per};
    if (opt.bad && strcmp(opt.bad, "touched") == 0) p[0] = 1; /* in its page tables before the handover */
    struct uffdio_register reg = {
        .range = {(uintptr_t)p, per},
        .mode = UFFDIO_REGISTER_MODE_MISSING | (opt.shared ? UFFDIO_REGISTER_MODE_MINOR : 0)};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) die(2, "UFFDIO_REGISTER");
  }
}

static int connect_handler(void) {
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  strncpy(a.sun_path, opt.socket_path, sizeof a.sun_path - 1);
  if (s < 0 || connect(s, (struct sockaddr*)&a, sizeof a) != 0) die(2, "connecting to the handler");
  return s;
}

/* The userfaultfd `fd` (none when < 0), and with --shared the memfd. */
static void send_handshake(int s, const char* body, int fd) {
  struct iovec iov = {(void*)body, strlen(body)};
  union {
    struct cmsghdr h;
    char buf[CMSG_SPACE(2 * sizeof(int))];
  } c;
  struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
  if (fd >= 0) {
    const int fds[2] = {fd, memfd};
    const size_t n = memfd >= 0 ? 2 : 1;
    memset(&c, 0, sizeof c);
    m.msg_control = c.buf;
    m.msg_controllen = CMSG_SPACE(n * sizeof(int));
    struct cmsghdr* h = CMSG_FIRSTHDR(&m);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(n * sizeof(int));
    memcpy(CMSG_DATA(h), fds, n * sizeof(int));
  }
  if (sendmsg(s, &m, 0) != (ssize_t)iov.iov_len) die(2, "sending the handshake");
}

static char* mappings_json(void) {
  size_t cap = 256 * (size_t)opt.mappings + 8, len = 0;
  char* j = malloc(cap);
  len += (size_t)snprintf(j + len, cap - len, "[");
  for (int i = 0; i < opt.mappings; ++i) {
    if (opt.legacy_page_size) {
      len += (size_t)snprintf(j + len, cap - len,
                              "%s{\"base_host_virt_addr\": %zu, \"size\": %zu, \"offset\": %zu, \"page_size_kib\": %zu}",
                              i ? ", " : "", (size_t)maps[i].base, maps[i].size, maps[i].offset, opt.page);
    } else {
      len += (size_t)snprintf(j + len, cap - len,
                              "%s{\"base_host_virt_addr\": %zu, \"size\": %zu, \"offset\": %zu, \"page_size\": %zu, "
                              "\"page_size_kib\": %zu}",
                              i ? ", " : "", (size_t)maps[i].base, maps[i].size, maps[i].offset, opt.page, opt.page);
    }
  }
  snprintf(j + len, cap - len, "]");
  return j;
}

/* A refused handshake: the handler must close the connection. */
static int send_bad(int uffd) {
  char body[512];
  const size_t size = maps[0].size;
  const size_t base = (size_t)maps[0].base;
  int fd = uffd;
  if (strcmp(opt.bad, "malformed") == 0) {
    snprintf(body, sizeof body, "[{\"base_host_virt_addr\": %zu, \"size\": ", base);
  } else if (strcmp(opt.bad, "overlap") == 0) {
    snprintf(body, sizeof body,
             "[{\"base_host_virt_addr\": %zu, \"size\": %zu, \"offset\": 0, \"page_size\": 4096}, "
             "{\"base_host_virt_addr\": %zu, \"size\": %zu, \"offset\": %zu, \"page_size\": 4096}]",
             base, size, base + 4096, size, size);
  } else if (strcmp(opt.bad, "absurd") == 0) {
    snprintf(body, sizeof body,
             "[{\"base_host_virt_addr\": %zu, \"size\": 1152921504606846976, \"offset\": 0, \"page_size\": 4096}]",
             base);
  } else if (strcmp(opt.bad, "past-source") == 0) {
    snprintf(body, sizeof body,
             "[{\"base_host_virt_addr\": %zu, \"size\": %zu, \"offset\": %zu, \"page_size\": 4096}]", base, size,
             expect_size);
  } else if (strcmp(opt.bad, "nofd") == 0) {
    snprintf(body, sizeof body, "[{\"base_host_virt_addr\": %zu, \"size\": %zu, \"offset\": 0, \"page_size\": 4096}]",
             base, size);
    fd = -1;
  } else if (strcmp(opt.bad, "memfd-elsewhere") == 0) {
    /* The memfd is mapped there at another offset than the one claimed. */
    snprintf(body, sizeof body,
             "[{\"base_host_virt_addr\": %zu, \"size\": %zu, \"offset\": %zu, \"page_size\": %zu}]", base,
             size, maps[1].offset, opt.page);
  } else if (strcmp(opt.bad, "memfd-unsealed") == 0 || strcmp(opt.bad, "touched") == 0) {
    snprintf(body, sizeof body,
             "[{\"base_host_virt_addr\": %zu, \"size\": %zu, \"offset\": %zu, \"page_size\": %zu}]", base,
             size, maps[0].offset, opt.page);
  } else if (strcmp(opt.bad, "unregistered") == 0) {
    /* Memory the handshake names, never registered with the userfaultfd. */
    unsigned char* p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die(2, "mmap");
    snprintf(body, sizeof body,
             "[{\"base_host_virt_addr\": %zu, \"size\": %zu, \"offset\": 0, \"page_size\": 4096}]",
             (size_t)p, size);
  } else if (strcmp(opt.bad, "notuffd") == 0) {
    snprintf(body, sizeof body, "[{\"base_host_virt_addr\": %zu, \"size\": %zu, \"offset\": 0, \"page_size\": 4096}]",
             base, size);
    fd = STDERR_FILENO;
  } else {
    die(2, "unknown --bad kind");
  }
  const int s = connect_handler();
  send_handshake(s, body, fd);
  shutdown(s, SHUT_WR); /* a malformed one ends here */
  struct pollfd p = {s, POLLIN, 0};
  char c;
  if (poll(&p, 1, 20000) != 1 || read(s, &c, 1) != 0) {
    fprintf(stderr, "vmm_client: the handler kept a refused handshake's connection open\n");
    return 4;
  }
  return 0;
}

static size_t tmp_file(const char* name, int flags, char* path, size_t cap) {
  snprintf(path, cap, "%s/vmm-client-%d-%s", opt.dir, (int)getpid(), name);
  return (size_t)open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | flags, 0600);
}

/* Kernel accesses to missing pages: each must be served (or land) like a
 * thread's. Source pages used: a run of 8 from `*next`, per check. */
static void kernel_accesses(size_t* next) {
  const size_t run = 8 * opt.page;
  char path[512];
  /* write(2) from missing pages: the kernel reads them. */
  {
    const size_t off = *next;
    *next += run;
    int fd = (int)tmp_file("write", 0, path, sizeof path);
    if (fd < 0) die(2, "creating a file");
    if (write(fd, at(off), run) != (ssize_t)run) die(3, "write(2) from missing pages");
    unsigned char* back = malloc(run);
    if (pread(fd, back, run, 0) != (ssize_t)run || memcmp(back, expect + off, run) != 0) {
      errno = 0;
      die(3, "write(2) from missing pages wrote other bytes than the source's");
    }
    free(back);
    close(fd);
    unlink(path);
    printf("kernel: write(2) from missing pages: ok\n");
  }
  /* read(2) into missing pages: the kernel writes them; the file's bytes
   * must be what stays, never overwritten by the page arriving after. */
  {
    const size_t off = *next;
    *next += run;
    int fd = (int)tmp_file("read", 0, path, sizeof path);
    unsigned char* fill = malloc(run);
    memset(fill, 0xa5, run);
    if (fd < 0 || write(fd, fill, run) != (ssize_t)run) die(2, "writing a file");
    if (pread(fd, at(off), run, 0) != (ssize_t)run) die(3, "read(2) into missing pages");
    memcpy(expect + off, fill, run);
    for (size_t p = 0; p < run; p += opt.page) check_page(off + p, "read(2) into missing pages");
    free(fill);
    close(fd);
    unlink(path);
    printf("kernel: read(2) into missing pages: ok\n");
  }
  /* O_DIRECT both ways, where the filesystem has it. */
  {
    int fd = (int)tmp_file("direct", O_DIRECT, path, sizeof path);
    if (fd < 0 && errno == EINVAL) {
      printf("kernel: O_DIRECT: not on this filesystem (%s)\n", opt.dir);
    } else if (fd < 0) {
      die(2, "creating an O_DIRECT file");
    } else {
      const size_t off = *next;
      *next += run;
      if (pwrite(fd, at(off), run, 0) != (ssize_t)run) die(3, "O_DIRECT write from missing pages");
      unsigned char* back = aligned_alloc(4096, run);
      if (pread(fd, back, run, 0) != (ssize_t)run || memcmp(back, expect + off, run) != 0) {
        errno = 0;
        die(3, "O_DIRECT write from missing pages wrote other bytes than the source's");
      }
      const size_t off2 = *next;
      *next += run;
      memset(back, 0x5a, run);
      if (pwrite(fd, back, run, 0) != (ssize_t)run) die(2, "O_DIRECT write");
      if (pread(fd, at(off2), run, 0) != (ssize_t)run) die(3, "O_DIRECT read into missing pages");
      memcpy(expect + off2, back, run);
      for (size_t p = 0; p < run; p += opt.page) check_page(off2 + p, "O_DIRECT read into missing pages");
      free(back);
      close(fd);
      unlink(path);
      printf("kernel: O_DIRECT write from and read into missing pages: ok\n");
    }
  }
  /* process_vm_readv of missing pages (another process's reader would do
   * the same; this one is its own). */
  {
    const size_t off = *next;
    *next += run;
    unsigned char* buf = malloc(run);
    struct iovec local = {buf, run}, remote = {at(off), run};
    if (process_vm_readv(getpid(), &local, 1, &remote, 1, 0) != (ssize_t)run) die(3, "process_vm_readv");
    if (memcmp(buf, expect + off, run) != 0) {
      errno = 0;
      die(3, "process_vm_readv read other bytes than the source's");
    }
    free(buf);
    printf("kernel: process_vm_readv of missing pages: ok\n");
  }
  /* A socket sending from missing pages. */
  {
    const size_t off = *next;
    *next += 4 * opt.page;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) die(2, "socketpair");
    const int big = 1 << 20;
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (send(sv[0], at(off), 4 * opt.page, 0) != (ssize_t)(4 * opt.page)) die(3, "send(2) from missing pages");
    unsigned char* buf = malloc(4 * opt.page);
    size_t got = 0;
    while (got < 4 * opt.page) {
      const ssize_t n = recv(sv[1], buf + got, 4 * opt.page - got, 0);
      if (n <= 0) die(3, "recv");
      got += (size_t)n;
    }
    if (memcmp(buf, expect + off, 4 * opt.page) != 0) {
      errno = 0;
      die(3, "send(2) from missing pages sent other bytes than the source's");
    }
    free(buf);
    close(sv[0]);
    close(sv[1]);
    printf("kernel: send(2) from missing pages: ok\n");
  }
  /* /proc/self/mem does not reach userfaultfd: what a reader gets. */
  {
    const size_t off = *next;
    *next += opt.page;
    int fd = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
    unsigned char* buf = malloc(opt.page);
    errno = 0;
    const ssize_t n = fd < 0 ? -1 : pread(fd, buf, opt.page, (off_t)(uintptr_t)at(off));
    if (n == (ssize_t)opt.page && memcmp(buf, expect + off, opt.page) != 0) {
      errno = 0;
      die(3, "/proc/self/mem read a missing page as other bytes than the source's");
    }
    printf("kernel: /proc/self/mem of a missing page: %s\n",
           n == (ssize_t)opt.page ? "served" : (n < 0 ? strerror(errno) : "short read"));
    free(buf);
    if (fd >= 0) close(fd);
  }
}

int main(int argc, char** argv) {
  static const struct option longs[] = {
      {"socket", required_argument, 0, 's'},  {"expect", required_argument, 0, 'e'},
      {"dir", required_argument, 0, 'd'},     {"bad", required_argument, 0, 'b'},
      {"page-size", required_argument, 0, 'p'}, {"mappings", required_argument, 0, 'm'},
      {"threads", required_argument, 0, 't'}, {"exit-after", required_argument, 0, 'x'},
      {"kernel", no_argument, 0, 'k'},        {"remove", no_argument, 0, 'r'},
      {"legacy-page-size", no_argument, 0, 'l'}, {"pause-ms", required_argument, 0, 'w'},
      {"shared", no_argument, 0, 'S'},        {0, 0, 0, 0}};
  for (int c; (c = getopt_long(argc, argv, "", longs, NULL)) != -1;) {
    switch (c) {
      case 's': opt.socket_path = optarg; break;
      case 'e': opt.expect_path = optarg; break;
      case 'd': opt.dir = optarg; break;
      case 'b': opt.bad = optarg; break;
      case 'p': opt.page = strtoul(optarg, NULL, 0); break;
      case 'm': opt.mappings = atoi(optarg); break;
      case 't': opt.threads = atoi(optarg); break;
      case 'x': opt.exit_after = atol(optarg); break;
      case 'k': opt.kernel = 1; break;
      case 'r': opt.remove = 1; break;
      case 'l': opt.legacy_page_size = 1; break;
      case 'w': opt.pause_ms = atol(optarg); break;
      case 'S': opt.shared = 1; break;
      default: return 2;
    }
  }
  if (!opt.socket_path || !opt.expect_path || opt.mappings < 1 || opt.mappings > 16 || opt.threads < 1) {
    fprintf(stderr, "usage: vmm_client --socket PATH --expect FILE [--mappings N] [--threads N] [--page-size B] "
                    "[--exit-after PAGES] [--pause-ms MS] [--kernel --dir DIR] [--remove] [--shared] [--legacy-page-size] [--bad KIND]\n");
    return 2;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  int fd = open(opt.expect_path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) die(2, "opening --expect");
  expect_size = (size_t)lseek(fd, 0, SEEK_END);
  expect = malloc(expect_size);
  if (pread(fd, expect, expect_size, 0) != (ssize_t)expect_size) die(2, "reading --expect");
  close(fd);

  const int uffd = make_uffd();
  map_memory(uffd);
  if (opt.bad) return send_bad(uffd);
  char* body = mappings_json();
  const int s = connect_handler();
  send_handshake(s, body, uffd);
  free(body);

  if (opt.pause_ms > 0) usleep((useconds_t)opt.pause_ms * 1000);
  size_t next = 0; /* source offset of the next pages the kernel checks take */
  if (opt.kernel) kernel_accesses(&next);
  if (opt.remove) {
    /* A balloon inflating, with some of the range here already and the
     * rest not yet fetched: all of it reads as zeros from then on. */
    struct mapping* m = &maps[0];
    const size_t len = m->size / 2 / opt.page * opt.page;
    for (size_t p = 0; p < 64 * opt.page && p < len; p += opt.page) check_page(m->offset + p, "a page before removal");
    /* Shared memory: MADV_DONTNEED keeps the memfd's bytes, what was
     * written included, and MADV_REMOVE punches them out (zeros). */
    if (opt.shared) {
      memset(m->base + opt.page, 0x6b, opt.page);
      if (madvise(m->base + opt.page, opt.page, MADV_DONTNEED) != 0) die(2, "madvise(MADV_DONTNEED)");
      memset(expect + m->offset + opt.page, 0x6b, opt.page);
      check_page(m->offset + opt.page, "a written page of shared memory after MADV_DONTNEED");
      printf("remove: a written page of shared memory kept its bytes through MADV_DONTNEED\n");
    }
    if (madvise(m->base, len, opt.shared ? MADV_REMOVE : MADV_DONTNEED) != 0) die(2, "madvise of the balloon");
    memset(expect + m->offset, 0, len);
    for (size_t p = 0; p < 8 * opt.page && p < len; p += opt.page) check_page(m->offset + p, "a removed page");
    /* And written again, it keeps what was written. */
    memset(m->base, 0x3c, opt.page);
    memset(expect + m->offset, 0x3c, opt.page);
    check_page(m->offset, "a removed page written again");
    if (opt.shared) {
      /* Shared memory keeps it through MADV_DONTNEED too. */
      if (madvise(m->base, opt.page, MADV_DONTNEED) != 0) die(2, "madvise(MADV_DONTNEED)");
      check_page(m->offset, "a removed page written again, after MADV_DONTNEED");
    }
    printf("remove: %zu bytes removed, read as zeros by the threads below\n", len);
  }
  pthread_t th[64];
  const int n = opt.threads > 64 ? 64 : opt.threads;
  opt.threads = n;
  for (long t = 0; t < n; ++t) pthread_create(&th[t], NULL, toucher, (void*)t);
  for (int t = 0; t < n; ++t) pthread_join(th[t], NULL);
  printf("threads: %ld pages read by %d threads: ok\n", atomic_load(&touched), n);

  close(s);
  return 0;
}
