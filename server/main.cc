// pdserve: one binary for every role and tool.
#include <cstdio>
#include <cstring>
#include <string>

#include "server/commands.h"

namespace {
void Usage() {
  std::fprintf(stderr,
               "usage: pdserve <command> [flags]\n"
               "commands:\n"
               "  make-model   write an HF model directory with random weights\n"
               "  generate     generate tokens offline with a model directory\n"
               "  tokenize     encode text lines or decode id arrays with a tokenizer.json\n"
               "  chat-template  render a model's chat template for JSON lines of messages\n"
               "  profile      time the engine and fit the scheduler's latency model\n"
               "  plan         search instance counts for the SLOs in the simulator\n"
               "  up           start a local cluster (front-end + workers) on 127.0.0.1\n"
               "  frontend     the gRPC front-end (public API, worker registry)\n"
               "  prefill      a prefill worker\n"
               "  decode       a decode worker\n"
               "  colocated    a worker running both phases (the colocated baseline)\n"
               "Run 'pdserve <command> --help' for a command's flags.\n");
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    Usage();
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  if (command == "make-model") return pds::server::MakeModelMain(argc, argv);
  if (command == "generate") return pds::server::GenerateMain(argc, argv);
  if (command == "tokenize") return pds::server::TokenizeMain(argc, argv);
  if (command == "chat-template") return pds::server::ChatTemplateMain(argc, argv);
  if (command == "profile") return pds::server::ProfileMain(argc, argv);
  if (command == "plan") return pds::server::PlanMain(argc, argv);
  if (command == "up") return pds::server::UpMain(argc, argv);
  if (command == "frontend") return pds::server::FrontendMain(argc, argv);
  if (command == "prefill" || command == "decode" || command == "colocated") {
    return pds::server::WorkerMain(argc, argv, argv[1]);
  }
  std::fprintf(stderr, "pdserve: unknown command '%s'\n", command.c_str());
  Usage();
  return 2;
}
