// pdserve subcommands. Each returns the process exit code and prints errors to stderr.
#pragma once

namespace pds::server {

int MakeModelMain(int argc, char** argv);  // pdserve make-model ...
int GenerateMain(int argc, char** argv);   // pdserve generate ...
int TokenizeMain(int argc, char** argv);   // pdserve tokenize ...

}  // namespace pds::server
