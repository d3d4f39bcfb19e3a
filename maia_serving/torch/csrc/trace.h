// What each operator on maia did, for pricing: its name, its arguments' shapes, dtypes and strides
// (and scalar arguments, which the FLOP formulas of convolution and friends need), its results', and
// the host time it took. The log is drained by Python (maia_serving.torch.pricing), which prices each
// event with the emulator's cost model; the C++ side only records.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <variant>
#include <vector>

namespace maia {

struct Meta {
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  int64_t offset = 0;
  int8_t dtype = 0;      // c10::ScalarType
  int8_t device = -1;    // the chip, or -1 for the host
};

using Arg = std::variant<std::monostate, Meta, int64_t, double, bool, std::vector<int64_t>, std::vector<Meta>>;

struct Event {
  std::string op;
  int8_t device = 0;
  std::vector<Arg> args;
  std::vector<Meta> outputs;
  int64_t host_ns = 0;
};

Meta meta_of(const at::Tensor& t);
Arg arg_of(const c10::IValue& value);

void record(Event&& event);
std::vector<Event> drain();
// Called (from the operator's thread) when the log holds ``threshold`` events, so a long loop that
// never asks for its figures keeps a bounded log.
void on_full(std::function<void()> flush, size_t threshold);

// Times one operator on the host and records it when it ends.
class Span {
 public:
  Span(std::string op, c10::DeviceIndex device);
  Span(const Span&) = delete;
  Span& operator=(const Span&) = delete;
  void args(std::vector<Arg> args) { event_.args = std::move(args); }
  void outputs(std::vector<Meta> outputs) { event_.outputs = std::move(outputs); }
  // A copy's source and destination (either may be on the host).
  void copy(const at::Tensor& src, const at::Tensor& dst) const;
  ~Span();

 private:
  mutable Event event_;
  std::chrono::steady_clock::time_point start_;
  int uncaught_;  // an operator that throws is not priced
};

}  // namespace maia
