// pdbench: the SLO load-test harness for pdserve's Serving API (see docs/distserve-experiment.md
// and `pdbench --help`). A library entry point so tests run the same command line.
#pragma once

namespace pds::client {

// Runs `pdbench ARGS...` (argv[0] is the program name). The summary goes to stdout, progress
// and errors to stderr. Returns 0 on success, 2 for bad arguments, 1 when the target could not
// be contacted, no request completed, or an output file could not be written.
int PdbenchMain(int argc, char** argv);

}  // namespace pds::client
