#include <csignal>

#include "client/pdbench.h"

int main(int argc, char** argv) {
  // Debian's cpp-httplib sends without MSG_NOSIGNAL: a server that closes a connection while
  // --api openai writes to it must not kill the run.
  signal(SIGPIPE, SIG_IGN);
  return pds::client::PdbenchMain(argc, argv);
}
