// What the GPU benchmarks share besides their failure machinery (gpu_check.h): the result row,
// its table and JSON forms, timing helpers and opening the device.
#ifndef PDS_BENCH_REPORT_H_
#define PDS_BENCH_REPORT_H_

#include <cuda_runtime_api.h>

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"

namespace pds::bench {

using Json = nlohmann::ordered_json;

// One result row: a value against a ceiling measured in the same run.
struct Metric {
  std::string name;
  std::string shape;
  double value = 0;  // in `unit`
  std::string unit;
  double ceiling = 0;  // in `ceiling_unit`
  std::string ceiling_unit;
  double fraction = 0;  // of the ceiling (or floor / time for a latency)
  double target = 0;    // minimum fraction the issue asks for; 0: none
  std::string note;
  Json extra = Json::object();
};

// The rows as a table headed "metric value unit ceiling ... fraction target note", values with
// `decimals` digits after the point.
void PrintTable(const std::vector<Metric>& metrics, int decimals);
// A row as JSON (name, shape, value, unit, ceiling, ceiling_unit, fraction, target,
// meets_target, note, details).
Json ToJson(const Metric& m);

double Seconds(std::chrono::steady_clock::time_point since);
double Median(std::vector<double> v);
// Milliseconds of each of `samples` runs of `enqueue` on `stream`, each timed between two
// events, after `warmups` runs that are not recorded.
std::vector<double> EventTimesMs(cudaStream_t stream, int warmups, int samples,
                                 const std::function<void()>& enqueue);

struct DeviceInfo {
  cudaDeviceProp prop{};
  int driver = 0, runtime = 0;
};
// Makes `device` current and describes it; nullopt (after "<tool>: ..." on stderr) when there
// is no usable device or no such ordinal: the caller exits 2.
std::optional<DeviceInfo> OpenDevice(int device);

}  // namespace pds::bench

#endif  // PDS_BENCH_REPORT_H_
