// What each operator on maia did, for pricing. An operator's price depends only on its signature (its name,
// its arguments' shapes, strides and dtypes, its scalar arguments, its results'), and a model runs the same
// few hundred signatures over and over: each distinct signature is kept once, under an id, and each run of
// an operator is logged as (id, chip, host time). Python (maia_serving.torch.pricing) drains the log, prices
// each new signature once with the emulator's cost model, and sums the runs.
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
  int8_t dtype = 0;    // c10::ScalarType
  int8_t device = -1;  // the chip, or -1 for the host
  bool defined = false;
};

using Arg = std::variant<std::monostate, Meta, int64_t, double, bool, std::vector<int64_t>, std::vector<Meta>>;

struct Signature {
  std::string op;
  std::vector<Arg> args;
  std::vector<Meta> outputs;
};

// One run of an operator, as the log holds it (and hands it to Python as bytes).
struct Run {
  uint32_t id;
  int32_t device;
  int64_t host_ns;
};

Meta meta_of(const at::Tensor& t);
Arg arg_of(const c10::IValue& value);

// The signatures first seen since the last drain (their ids follow on from the previous ones) and the runs.
struct Drained {
  std::vector<Signature> signatures;
  std::vector<Run> runs;
};
Drained drain();
// Called (from the operator's thread) when the log holds ``threshold`` runs, so a long loop that never asks
// for its figures keeps a bounded log.
void on_full(std::function<void()> flush, size_t threshold);

// Times one operator on the host and logs it when it ends (not when it throws).
class Span {
 public:
  Span(std::string op, c10::DeviceIndex device);
  Span(const Span&) = delete;
  Span& operator=(const Span&) = delete;
  void args(std::vector<Arg> args) { signature_.args = std::move(args); }
  void outputs(std::vector<Meta> outputs) { signature_.outputs = std::move(outputs); }
  // A copy's source and destination (either may be on the host).
  void copy(const at::Tensor& src, const at::Tensor& dst);
  ~Span();

 private:
  Signature signature_;
  c10::DeviceIndex device_;
  std::chrono::steady_clock::time_point start_;
  int uncaught_;
};

}  // namespace maia
