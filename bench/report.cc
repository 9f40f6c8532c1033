#include "bench/report.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_format.h"
#include "bench/gpu_check.h"

namespace pds::bench {

void PrintTable(const std::vector<Metric>& metrics, int decimals) {
  std::printf("\n%-22s %12s %-8s %12s %-14s %8s %7s %s\n", "metric", "value", "unit", "ceiling", "",
              "fraction", "target", "note");
  for (const Metric& m : metrics) {
    std::string target = "-";
    if (m.target > 0) {
      target = absl::StrFormat("%s%.0f%%", m.fraction >= m.target ? ">=" : "<", m.target * 100);
    }
    std::printf("%-22s %12.*f %-8s %12.*f %-14s %7.1f%% %7s %s\n", m.name.c_str(), decimals,
                m.value, m.unit.c_str(), decimals, m.ceiling, m.ceiling_unit.c_str(),
                m.fraction * 100, target.c_str(), m.note.c_str());
  }
  std::fflush(stdout);
}

Json ToJson(const Metric& m) {
  Json j = {{"name", m.name},
            {"shape", m.shape},
            {"value", m.value},
            {"unit", m.unit},
            {"ceiling", m.ceiling},
            {"ceiling_unit", m.ceiling_unit},
            {"fraction", m.fraction},
            {"target", m.target > 0 ? Json(m.target) : Json()},
            {"meets_target", m.target > 0 ? Json(m.fraction >= m.target) : Json()},
            {"note", m.note}};
  j["details"] = m.extra;
  return j;
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

std::vector<double> EventTimesMs(cudaStream_t stream, int warmups, int samples,
                                 const std::function<void()>& enqueue) {
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int i = -warmups; i < samples; ++i) {
    CUDA_CHECK(cudaEventRecord(start, stream));
    enqueue();
    CUDA_CHECK(cudaEventRecord(stop, stream));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    if (i >= 0) ms.push_back(t);
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  return ms;
}

std::optional<DeviceInfo> OpenDevice(int device) {
  SetStage("device query");
  int count = 0;
  if (const cudaError_t err = cudaGetDeviceCount(&count); err != cudaSuccess || count == 0) {
    std::fprintf(stderr, "%s: no usable CUDA device (%s)\n", Tool(),
                 err != cudaSuccess ? cudaGetErrorString(err) : "device count 0");
    return std::nullopt;
  }
  if (device >= count) {
    std::fprintf(stderr, "%s: --device %d but only %d device(s)\n", Tool(), device, count);
    return std::nullopt;
  }
  DeviceInfo info;
  CUDA_CHECK(cudaSetDevice(device));
  CUDA_CHECK(cudaGetDeviceProperties(&info.prop, device));
  CUDA_CHECK(cudaDriverGetVersion(&info.driver));
  CUDA_CHECK(cudaRuntimeGetVersion(&info.runtime));
  return info;
}

}  // namespace pds::bench
