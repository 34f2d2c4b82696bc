// The C API (pagewire/pagewire_c.h): each call wraps the C++ one, and no
// exception crosses it: a failure becomes a status and the thread's
// pw_last_error().
#include "pagewire/pagewire_c.h"

#include <unistd.h>

#include <chrono>
#include <exception>
#include <memory>
#include <new>
#include <string>

#include "pagewire/handler.h"
#include "pagewire/pagewire.h"

struct pw_region {
  pagewire::Region region;
};

struct pw_server {
  std::unique_ptr<pagewire::MemoryServer> server;
};

namespace {

thread_local std::string last_error;

pw_status fail(pw_status s, const std::string& why) {
  last_error = why;
  return s;
}

// Runs f, turning what it throws into a status.
template <typename F>
pw_status guarded(F f) {
  try {
    f();
    return PW_OK;
  } catch (const pagewire::Error& e) {
    return fail(static_cast<pw_status>(e.code()), e.what());
  } catch (const std::bad_alloc&) {
    return fail(PW_NO_MEMORY, "out of memory");
  } catch (const std::exception& e) {
    return fail(PW_INTERNAL, e.what());
  }
}

pagewire::AttachOptions to_cpp(const pw_attach_options* o) {
  pagewire::AttachOptions a;
  if (o == nullptr) return a;
  a.handler_threads = o->handler_threads;
  a.queue_depth = o->queue_depth;
  a.background_pull = o->background_pull != 0;
  a.prefetch = o->prefetch != 0;
  a.request_timeout_ms = o->request_timeout_ms;
  a.reconnect_timeout_ms = o->reconnect_timeout_ms;
  if (o->key_file != nullptr) a.key_file = o->key_file;
  return a;
}

pw_stats to_c(const pagewire::Stats& s) {
  pw_stats c{};
  c.faults = s.faults;
  c.pages_fetched = s.pages_fetched;
  c.bytes_fetched = s.bytes_fetched;
  c.pages_zero = s.pages_zero;
  c.pages_pulled = s.pages_pulled;
  c.pages_refused = s.pages_refused;
  c.reconnects = s.reconnects;
  c.pages_present = s.pages_present;
  c.pages_total = s.pages_total;
  c.complete = s.complete ? 1 : 0;
  return c;
}

bool null_arg(const void* p, const char* name, pw_status* s) {
  if (p != nullptr) return false;
  *s = fail(PW_INVALID_ARGUMENT, std::string(name) + " is NULL");
  return true;
}

}  // namespace

extern "C" {

const char* pw_last_error(void) { return last_error.c_str(); }

const char* pw_status_name(pw_status status) {
  switch (status) {
    case PW_OK: return "PW_OK";
    case PW_BAD_URI: return "PW_BAD_URI";
    case PW_NOT_FOUND: return "PW_NOT_FOUND";
    case PW_CONNECT_FAILED: return "PW_CONNECT_FAILED";
    case PW_PROTOCOL: return "PW_PROTOCOL";
    case PW_OUT_OF_BOUNDS: return "PW_OUT_OF_BOUNDS";
    case PW_IO: return "PW_IO";
    case PW_TIMEOUT: return "PW_TIMEOUT";
    case PW_CLOSED: return "PW_CLOSED";
    case PW_UFFD_UNAVAILABLE: return "PW_UFFD_UNAVAILABLE";
    case PW_INVALID_ARGUMENT: return "PW_INVALID_ARGUMENT";
    case PW_CANCELLED: return "PW_CANCELLED";
    case PW_NO_MEMORY: return "PW_NO_MEMORY";
    case PW_BUSY: return "PW_BUSY";
    case PW_UNSUPPORTED: return "PW_UNSUPPORTED";
    case PW_SOURCE_CHANGED: return "PW_SOURCE_CHANGED";
    case PW_LEASED: return "PW_LEASED";
    case PW_AUTH: return "PW_AUTH";
    case PW_INTERNAL: return "PW_INTERNAL";
  }
  return "PW_UNKNOWN";
}

void pw_attach_options_init(pw_attach_options* options) {
  if (options == nullptr) return;
  const pagewire::AttachOptions d;
  *options = pw_attach_options{
      d.handler_threads,      d.queue_depth, d.background_pull ? 1 : 0, d.prefetch ? 1 : 0, d.request_timeout_ms,
      d.reconnect_timeout_ms, nullptr};
}

pw_status pw_attach(const char* uri, const pw_attach_options* options, pw_region** out) {
  pw_status s = PW_OK;
  if (null_arg(uri, "uri", &s) || null_arg(out, "out", &s)) return s;
  return guarded([&] { *out = new pw_region{pagewire::attach(uri, to_cpp(options))}; });
}

void pw_detach(pw_region* region) { delete region; }

void* pw_data(const pw_region* region) { return region == nullptr ? nullptr : region->region.data(); }

size_t pw_size(const pw_region* region) { return region == nullptr ? 0 : region->region.size(); }

pw_status pw_region_stats(const pw_region* region, pw_stats* out) {
  pw_status s = PW_OK;
  if (null_arg(region, "region", &s) || null_arg(out, "out", &s)) return s;
  return guarded([&] { *out = to_c(region->region.stats()); });
}

int pw_wait_complete(const pw_region* region, unsigned timeout_ms) {
  if (region == nullptr) return 0;
  return region->region.wait_complete(std::chrono::milliseconds(timeout_ms)) ? 1 : 0;
}

pw_status pw_server_start(const char* bind_address, uint16_t port, pw_server** out) {
  pw_status s = PW_OK;
  if (null_arg(bind_address, "bind_address", &s) || null_arg(out, "out", &s)) return s;
  return guarded([&] {
    pagewire::ServerOptions o;
    o.bind_address = bind_address;
    o.port = port;
    *out = new pw_server{std::make_unique<pagewire::MemoryServer>(o)};
  });
}

uint16_t pw_server_port(const pw_server* server) { return server == nullptr ? 0 : server->server->port(); }

pw_status pw_server_export_memory(pw_server* server, const char* name, const void* base, size_t length) {
  pw_status s = PW_OK;
  if (null_arg(server, "server", &s) || null_arg(name, "name", &s) || null_arg(base, "base", &s)) return s;
  return guarded([&] { server->server->export_memory(name, base, length); });
}

pw_status pw_server_export_file(pw_server* server, const char* name, const char* path) {
  pw_status s = PW_OK;
  if (null_arg(server, "server", &s) || null_arg(name, "name", &s) || null_arg(path, "path", &s)) return s;
  return guarded([&] { server->server->export_file(name, path); });
}

void pw_server_stop(pw_server* server) { delete server; }

pw_status pw_handler_serve_connection(int conn_fd, const char* source_uri, const pw_attach_options* options,
                                      int stop_fd, pw_handler_report* report) {
  pw_status s = PW_OK;
  if (null_arg(source_uri, "source_uri", &s)) {
    if (conn_fd >= 0) ::close(conn_fd);  // closed, as on every other path
    return s;
  }
  pagewire::HandlerReport r;
  s = guarded([&] {
    pagewire::HandlerOptions o;
    o.attach = to_cpp(options);
    r = pagewire::serve_handler_connection(conn_fd, source_uri, o, stop_fd);
  });
  if (report != nullptr) {
    *report = pw_handler_report{r.pid, r.served ? 1 : 0, r.complete ? 1 : 0, to_c(r.stats)};
  }
  if (s != PW_OK) return s;
  if (!r.error.empty()) return fail(static_cast<pw_status>(r.code), r.error);
  return PW_OK;
}

}  // extern "C"
