#include "trace.h"

#include <exception>
#include <mutex>
#include <unordered_map>

namespace maia {
namespace {

struct Log {
  std::mutex mutex;
  std::unordered_map<std::string, uint32_t> ids;  // signature key -> id
  Drained pending;
  std::function<void()> flush;
  size_t threshold = 0;
};

Log& log() {
  static Log l;
  return l;
}

template <typename T>
void put(std::string& key, const T& value) {
  key.append(reinterpret_cast<const char*>(&value), sizeof(T));
}

void put_ints(std::string& key, const std::vector<int64_t>& values) {
  put(key, static_cast<uint32_t>(values.size()));
  key.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(int64_t));
}

void put_meta(std::string& key, const Meta& m) {
  put(key, m.defined);
  put(key, m.dtype);
  put(key, m.device);
  put(key, m.offset);
  put_ints(key, m.sizes);
  put_ints(key, m.strides);
}

// A byte string equal for two signatures exactly when they price alike.
std::string key_of(const Signature& s) {
  std::string key = s.op;
  key.push_back('\0');
  for (const Arg& arg : s.args) {
    put(key, static_cast<uint8_t>(arg.index()));
    std::visit(
        [&key](const auto& v) {
          using T = std::decay_t<decltype(v)>;
          if constexpr (std::is_same_v<T, Meta>) {
            put_meta(key, v);
          } else if constexpr (std::is_same_v<T, std::vector<Meta>>) {
            put(key, static_cast<uint32_t>(v.size()));
            for (const Meta& m : v) {
              put_meta(key, m);
            }
          } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
            put_ints(key, v);
          } else if constexpr (!std::is_same_v<T, std::monostate>) {
            put(key, v);
          }
        },
        arg);
  }
  put(key, static_cast<uint8_t>(0xff));
  for (const Meta& m : s.outputs) {
    put_meta(key, m);
  }
  return key;
}

void record(Signature&& signature, c10::DeviceIndex device, int64_t host_ns) {
  std::string key = key_of(signature);
  std::function<void()> flush;
  {
    Log& l = log();
    std::lock_guard<std::mutex> lock(l.mutex);
    auto [it, fresh] = l.ids.try_emplace(std::move(key), static_cast<uint32_t>(l.ids.size()));
    if (fresh) {
      l.pending.signatures.push_back(std::move(signature));
    }
    l.pending.runs.push_back({it->second, static_cast<int32_t>(device), host_ns});
    if (l.flush && l.pending.runs.size() >= l.threshold) {
      flush = l.flush;
    }
  }
  if (flush) {
    flush();
  }
}

}  // namespace

Meta meta_of(const at::Tensor& t) {
  Meta m;
  if (!t.defined()) {
    return m;
  }
  m.defined = true;
  m.sizes = t.sizes().vec();
  m.strides = t.strides().vec();
  m.offset = t.storage_offset();
  m.dtype = static_cast<int8_t>(t.scalar_type());
  m.device = t.device().is_cpu() ? -1 : static_cast<int8_t>(t.device().index());
  return m;
}

Arg arg_of(const c10::IValue& v) {
  if (v.isTensor()) {
    return meta_of(v.toTensor());
  }
  if (v.isTensorList()) {
    std::vector<Meta> out;
    for (const at::Tensor& t : v.toTensorVector()) {
      out.push_back(meta_of(t));
    }
    return out;
  }
  if (v.isBool()) {
    return v.toBool();
  }
  if (v.isInt()) {
    return v.toInt();
  }
  if (v.isDouble()) {
    return v.toDouble();
  }
  if (v.isIntList()) {
    return v.toIntVector();
  }
  return std::monostate{};
}

Drained drain() {
  Log& l = log();
  std::lock_guard<std::mutex> lock(l.mutex);
  Drained out;
  std::swap(out, l.pending);
  return out;
}

void on_full(std::function<void()> flush, size_t threshold) {
  Log& l = log();
  std::lock_guard<std::mutex> lock(l.mutex);
  l.flush = std::move(flush);
  l.threshold = threshold;
}

Span::Span(std::string op, c10::DeviceIndex device)
    : device_(device), start_(std::chrono::steady_clock::now()), uncaught_(std::uncaught_exceptions()) {
  signature_.op = std::move(op);
}

void Span::copy(const at::Tensor& src, const at::Tensor& dst) {
  signature_.args = {meta_of(src), meta_of(dst)};
  signature_.outputs = {meta_of(dst)};
}

Span::~Span() {
  if (std::uncaught_exceptions() > uncaught_) {
    return;
  }
  const int64_t host_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start_).count();
  try {
    record(std::move(signature_), device_, host_ns);
  } catch (...) {  // a destructor must not throw; a lost run only loses its price
  }
}

}  // namespace maia
