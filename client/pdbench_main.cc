#include "client/pdbench.h"

int main(int argc, char** argv) { return pds::client::PdbenchMain(argc, argv); }
