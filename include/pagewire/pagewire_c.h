/* pagewire's C API: attach a region, serve or export memory, and be a
 * VMM's page-fault handler, from C (and from Rust or any language that
 * calls C). No C++ types cross it: opaque handles, plain structs, status
 * codes. Link with `pkg-config --cflags --libs pagewire` (a static
 * libpagewire brings its C++ runtime along through that line).
 *
 * Errors: every call that can fail returns a pw_status (PW_OK, 0, on
 * success) and leaves the reason in pw_last_error(), per thread, until the
 * thread's next failing call. A failing call changes nothing it was given. */
#ifndef PAGEWIRE_PAGEWIRE_C_H
#define PAGEWIRE_PAGEWIRE_C_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The same values as pagewire::Errc. */
typedef enum pw_status {
  PW_OK = 0,
  PW_BAD_URI = 1,
  PW_NOT_FOUND = 2,
  PW_CONNECT_FAILED = 3,
  PW_PROTOCOL = 4,
  PW_OUT_OF_BOUNDS = 5,
  PW_IO = 6,
  PW_TIMEOUT = 7,
  PW_CLOSED = 8,
  PW_UFFD_UNAVAILABLE = 9,
  PW_INVALID_ARGUMENT = 10,
  PW_CANCELLED = 11,
  PW_NO_MEMORY = 12,
  PW_BUSY = 13,
  PW_UNSUPPORTED = 14,
  PW_SOURCE_CHANGED = 15,
  PW_LEASED = 16,
  PW_AUTH = 17,
  PW_INTERNAL = 99 /* anything else that went wrong; see pw_last_error() */
} pw_status;

/* The calling thread's last failure, as text ("" when none). */
const char* pw_last_error(void);
/* A status's name ("PW_OK", "PW_TIMEOUT", ...). */
const char* pw_status_name(pw_status status);

/* How a region is attached (pagewire::AttachOptions; pw_attach_options_init
 * fills in pagewire's defaults). */
typedef struct pw_attach_options {
  unsigned handler_threads;      /* 0: pagewire's default */
  unsigned queue_depth;          /* reads in flight per handler */
  int background_pull;           /* nonzero: pull the whole region in the background */
  int prefetch;                  /* nonzero: read ahead of sequential faults */
  unsigned request_timeout_ms;   /* a read that takes longer fails */
  unsigned reconnect_timeout_ms; /* how long a dropped connection is retried */
  const char* key_file;          /* the key a keyed server asks for; NULL: none */
} pw_attach_options;

void pw_attach_options_init(pw_attach_options* options);

/* A region's counters (pagewire::Stats, the ones most users read). */
typedef struct pw_stats {
  uint64_t faults;
  uint64_t pages_fetched;
  uint64_t bytes_fetched;
  uint64_t pages_zero;
  uint64_t pages_pulled;
  uint64_t pages_refused;
  uint64_t reconnects;
  uint64_t pages_present;
  uint64_t pages_total;
  int complete; /* every page is here; the region is plain memory */
} pw_stats;

typedef struct pw_region pw_region;

/* Attaches the region at `uri` (tcp://, rdma://, auto://HOST:PORT/NAME);
 * options NULL: defaults. On success *out is the region. */
pw_status pw_attach(const char* uri, const pw_attach_options* options, pw_region** out);
/* Detaches and frees the region: its memory is unmapped. NULL is ignored. */
void pw_detach(pw_region* region);
void* pw_data(const pw_region* region);
size_t pw_size(const pw_region* region);
pw_status pw_region_stats(const pw_region* region, pw_stats* out);
/* 1 once every page is here, 0 when `timeout_ms` passed first. */
int pw_wait_complete(const pw_region* region, unsigned timeout_ms);

typedef struct pw_server pw_server;

/* A memory server on `bind_address`:`port` (port 0: a free one), over TCP
 * (and RDMA where a device is there). */
pw_status pw_server_start(const char* bind_address, uint16_t port, pw_server** out);
uint16_t pw_server_port(const pw_server* server);
/* Exports memory the caller keeps mapped until pw_server_stop(). */
pw_status pw_server_export_memory(pw_server* server, const char* name, const void* base, size_t length);
/* Exports a file's bytes. */
pw_status pw_server_export_file(pw_server* server, const char* name, const char* path);
/* Stops serving and frees the server. NULL is ignored. */
void pw_server_stop(pw_server* server);

/* A VMM's connection to its page-fault handler (see pagewire/handler.h). */
typedef struct pw_handler_report {
  pid_t pid;    /* the process served (SO_PEERCRED) */
  int served;   /* its handshake was taken */
  int complete; /* every page arrived */
  pw_stats stats;
} pw_handler_report;

/* Serves one connected Unix socket: reads the handshake (mappings as JSON,
 * the userfaultfd as SCM_RIGHTS), serves that process's faults from
 * `source_uri` until it exits or `stop_fd` (-1: none) becomes readable,
 * and closes `conn_fd`. Blocks meanwhile. PW_OK when the process was
 * served to its end; otherwise the reason (a refused handshake, a source
 * that failed), with `report` (may be NULL) filled in either way. */
pw_status pw_handler_serve_connection(int conn_fd, const char* source_uri, const pw_attach_options* options,
                                      int stop_fd, pw_handler_report* report);

#ifdef __cplusplus
}
#endif

#endif /* PAGEWIRE_PAGEWIRE_C_H */
