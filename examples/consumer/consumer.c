/* The C API (pagewire/pagewire_c.h) as a C11 program uses it: attaches a
 * region that `pagewire serve --file NAME=PATH` exports and checks every
 * byte against PATH; serves memory of its own and attaches that too; and
 * checks that bad input gets a status and a message. Exits 0 when all of
 * it holds, 1 on a wrong byte, 2 on any other failure.
 *
 *   gcc -std=c11 -Wall -Werror consumer.c $(pkg-config --cflags --libs pagewire)
 *   pagewire serve --port 7471 --file data=/tmp/data &
 *   ./a.out tcp://127.0.0.1:7471/data /tmp/data */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pagewire/pagewire_c.h"

static int failed(const char* what, pw_status s) {
  fprintf(stderr, "c consumer: %s: %s: %s\n", what, pw_status_name(s), pw_last_error());
  return 2;
}

/* Attaches `uri` and compares it with `want` byte for byte. */
static int attach_and_verify(const char* uri, const unsigned char* want, size_t size) {
  pw_attach_options o;
  pw_attach_options_init(&o);
  o.handler_threads = 2;
  pw_region* r = NULL;
  const pw_status s = pw_attach(uri, &o, &r);
  if (s != PW_OK) return failed("pw_attach", s);
  if (pw_size(r) != size) {
    fprintf(stderr, "c consumer: %s is %zu bytes, expected %zu\n", uri, pw_size(r), size);
    pw_detach(r);
    return 2;
  }
  const unsigned char* data = pw_data(r);
  for (size_t i = 0; i < size; ++i) {
    if (data[i] != want[i]) {
      fprintf(stderr, "c consumer: %s: byte %zu is %u, expected %u\n", uri, i, data[i], want[i]);
      pw_detach(r);
      return 1;
    }
  }
  pw_stats st;
  if (pw_region_stats(r, &st) != PW_OK) return failed("pw_region_stats", PW_INTERNAL);
  printf("c consumer: %s: %zu bytes exact, %llu faults, %llu pages fetched, %llu zero pages\n", uri, size,
         (unsigned long long)st.faults, (unsigned long long)st.pages_fetched, (unsigned long long)st.pages_zero);
  pw_detach(r);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s URI FILE (the file the URI's region is served from)\n", argv[0]);
    return 2;
  }
  FILE* f = fopen(argv[2], "rb");
  if (f == NULL) return fprintf(stderr, "c consumer: cannot read %s\n", argv[2]), 2;
  fseek(f, 0, SEEK_END);
  const size_t size = (size_t)ftell(f);
  fseek(f, 0, SEEK_SET);
  unsigned char* want = malloc(size);
  if (want == NULL || fread(want, 1, size, f) != size) return fprintf(stderr, "c consumer: reading failed\n"), 2;
  fclose(f);

  int rc = attach_and_verify(argv[1], want, size);
  if (rc != 0) return rc;

  /* Memory of its own, served and attached. */
  pw_server* server = NULL;
  pw_status s = pw_server_start("127.0.0.1", 0, &server);
  if (s != PW_OK) return failed("pw_server_start", s);
  s = pw_server_export_memory(server, "mine", want, size);
  if (s != PW_OK) return failed("pw_server_export_memory", s);
  char uri[128];
  snprintf(uri, sizeof uri, "tcp://127.0.0.1:%u/mine", (unsigned)pw_server_port(server));
  rc = attach_and_verify(uri, want, size);
  if (rc != 0) return rc;

  /* Bad input: a status and a reason, nothing attached. */
  pw_region* r = NULL;
  s = pw_attach("nonsense://", NULL, &r);
  if (s != PW_BAD_URI || r != NULL || strlen(pw_last_error()) == 0) {
    fprintf(stderr, "c consumer: a bad URI gave %s (\"%s\")\n", pw_status_name(s), pw_last_error());
    return 2;
  }
  printf("c consumer: a bad URI: %s: %s\n", pw_status_name(s), pw_last_error());
  snprintf(uri, sizeof uri, "tcp://127.0.0.1:%u/absent", (unsigned)pw_server_port(server));
  s = pw_attach(uri, NULL, &r);
  if (s != PW_NOT_FOUND || r != NULL) {
    fprintf(stderr, "c consumer: an unknown region gave %s\n", pw_status_name(s));
    return 2;
  }
  pw_server_stop(server);
  free(want);
  printf("c consumer: ok\n");
  return 0;
}
