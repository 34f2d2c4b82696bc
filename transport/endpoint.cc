#include "transport/endpoint.h"

#include <netdb.h>

#include <cstring>

#include "pagewire/error.h"

namespace pagewire {

Endpoint resolve(const std::string& host, uint16_t port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string port_text = std::to_string(port);
  int rc = ::getaddrinfo(host.c_str(), port_text.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    throw Error(Errc::kConnectFailed, "cannot resolve host '" + host + "': " + ::gai_strerror(rc));
  }
  Endpoint ep;
  for (const addrinfo* a = res; a != nullptr; a = a->ai_next) {
    Address& x = ep.addresses.emplace_back();
    std::memcpy(&x.addr, a->ai_addr, a->ai_addrlen);
    x.addr_len = a->ai_addrlen;
  }
  ep.addr = ep.addresses.front().addr;
  ep.addr_len = ep.addresses.front().addr_len;
  ep.text = (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + port_text;
  ::freeaddrinfo(res);
  return ep;
}

}  // namespace pagewire
