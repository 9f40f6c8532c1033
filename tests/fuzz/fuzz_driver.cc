// A bounded, deterministic replay driver for fuzz targets when libFuzzer is not used: runs
// every seed, files given on the command line, and a fixed number of seeded mutations of the
// seeds (bit flips, byte changes, truncation, splicing, repeated chunks).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>

#include "tests/fuzz/fuzz_target.h"

namespace {
void RunOne(const std::string& input) {
  LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(input.data()), input.size());
}

std::string Mutate(const std::string& seed, const std::vector<std::string>& seeds,
                   std::mt19937_64& rng) {
  std::string s = seed;
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int e = 0; e < edits; ++e) {
    const size_t pos = s.empty() ? 0 : rng() % s.size();
    switch (rng() % 6) {
      case 0:
        if (!s.empty()) s[pos] ^= static_cast<char>(1u << (rng() % 8));
        break;
      case 1:
        if (!s.empty()) s[pos] = static_cast<char>(rng());
        break;
      case 2:
        s.resize(pos);
        break;
      case 3: {
        const std::string& other = seeds[rng() % seeds.size()];
        const size_t from = other.empty() ? 0 : rng() % other.size();
        s = s.substr(0, pos) + other.substr(from);
        break;
      }
      case 4: {
        const size_t len = std::min<size_t>(s.size() - std::min(pos, s.size()), 1 + rng() % 16);
        s.insert(pos, s.substr(pos, len));
        break;
      }
      case 5: {
        static const char* kTokens[] = {"-1", "1e308", "18446744073709551615", "null", "[]", "{}",
                                        "\"", "0",     "9223372036854775807",  "true"};
        s.insert(std::min(pos, s.size()), kTokens[rng() % 10]);
        break;
      }
    }
  }
  return s;
}
}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> seeds = FuzzSeeds();
  for (const auto& seed : seeds) RunOne(seed);
  int iterations = 20000;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--iterations=", 0) == 0) {
      iterations = std::atoi(arg.c_str() + 13);
      continue;
    }
    std::ifstream in(arg, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    RunOne(ss.str());
  }
  std::mt19937_64 rng(20261127);
  const auto start = std::chrono::steady_clock::now();
  int ran = 0;
  for (; ran < iterations; ++ran) {
    RunOne(Mutate(seeds[rng() % seeds.size()], seeds, rng));
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(20)) break;
  }
  std::printf("fuzz driver: %zu seeds and %d mutations ran without a crash\n", seeds.size(), ran);
  return 0;
}
