// Write key/value rows into a paged cache in one call per layer, bit for bit what the references
// write: an unquantized cache of the rows' dtype as a copy, FP8 as ops/fp8.py's quantize_fp8_ref
// (divide by the scale, clamp, and torch's own c10 conversion), the block-scaled formats (OCP MX,
// NVFP4) as ops/mx.py's quantize_mx_ref: the same float32 operations in the same order (powers of
// two are exact, division and rounding as torch does them: one IEEE rounding, ties to even), so
// every element code and scale byte is the reference's.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/ones.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

struct Minifloat {
  int64_t bits, mantissa_bits, bias, max_code;
};

// floor(log2(a)) for a finite a > 0 (frexp's exponent - 1), from the bits; frexp for subnormals.
inline int32_t binade_of(float a) {
  uint32_t bits;
  std::memcpy(&bits, &a, sizeof bits);
  const int32_t field = static_cast<int32_t>(bits >> 23 & 0xFF);
  if (field == 0) {
    int exponent = 0;
    std::frexp(a, &exponent);
    return exponent - 1;
  }
  return field - 127;
}

// 2^k exactly, built from the bits where it is a normal float32 (ldexp, a library call per element,
// was most of a block-scaled write's time); ldexp outside that range.
inline float pow2(int32_t k) {
  if (k < -126 || k > 127) return std::ldexp(1.0f, k);
  const uint32_t bits = static_cast<uint32_t>(k + 127) << 23;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// encode_minifloat_ref for one finite float32 value.
inline int32_t encode(float y, const Minifloat& e) {
  const float a = std::fabs(y);
  const int32_t lowest = static_cast<int32_t>(1 - e.bias);
  const int32_t binade = a > 0.0f ? std::max<int32_t>(binade_of(a), lowest) : lowest;
  const float steps = std::nearbyint(a * pow2(static_cast<int32_t>(e.mantissa_bits) - binade));
  int32_t code = ((binade + static_cast<int32_t>(e.bias) - 1) << e.mantissa_bits) + static_cast<int32_t>(steps);
  code = std::min<int32_t>(code, static_cast<int32_t>(e.max_code));
  return code | (std::signbit(y) ? 1 << (e.bits - 1) : 0);
}

inline float decode(int32_t code, const Minifloat& e) {  // a finite, non-negative code
  const int32_t exponent = code >> e.mantissa_bits, mantissa = code & ((1 << e.mantissa_bits) - 1);
  if (exponent > 0)
    return std::ldexp(static_cast<float>(mantissa + (1 << e.mantissa_bits)),
                      exponent - static_cast<int32_t>(e.bias + e.mantissa_bits));
  return std::ldexp(static_cast<float>(mantissa), static_cast<int32_t>(1 - e.bias - e.mantissa_bits));
}

constexpr Minifloat kE4M3{8, 3, 7, 0x7E};
constexpr int32_t kE4M3Nan = 0x7F, kE8M0Nan = 0xFF, kE8M0Bias = 127;

template <typename T>
void write_row(const T* src, uint8_t* dst, int64_t head_dim, int64_t block, const Minifloat& elem, int64_t emax,
               float max_value, bool e8m0, float tensor_scale) {
  const int64_t blocks = (head_dim + block - 1) / block, elem_bytes = block * elem.bits / 8;
  float x[64];
  int32_t codes[64];
  for (int64_t b = 0; b < blocks; ++b) {
    float amax = 0.0f;
    bool special = false;
    for (int64_t i = 0; i < block; ++i) {
      const int64_t d = b * block + i;
      x[i] = d < head_dim ? static_cast<float>(src[d]) : 0.0f;
      if (std::isfinite(x[i]))
        amax = std::max(amax, std::fabs(x[i]));
      else
        special = true;
    }
    int32_t scale_code;
    if (e8m0) {
      int32_t shared = -kE8M0Bias;
      if (amax > 0.0f) shared = std::max<int32_t>(binade_of(amax) - static_cast<int32_t>(emax), -kE8M0Bias);
      scale_code = special ? kE8M0Nan : shared + kE8M0Bias;
      const float factor = pow2(-shared);
      for (int64_t i = 0; i < block; ++i) x[i] = special ? 0.0f : x[i] * factor;
    } else {  // NVFP4: an E4M3 block scale over the per-tensor one
      const int32_t code = encode(amax / (max_value * tensor_scale), kE4M3);
      const float denominator = decode(code, kE4M3) * tensor_scale;
      scale_code = special ? kE4M3Nan : code;
      for (int64_t i = 0; i < block; ++i)
        x[i] = special ? 0.0f : (denominator > 0.0f ? x[i] / denominator : x[i] * 0.0f);
    }
    for (int64_t i = 0; i < block; ++i) codes[i] = encode(x[i], elem);
    uint8_t* out = dst + b * (elem_bytes + 1);
    if (elem.bits == 8) {
      for (int64_t i = 0; i < block; ++i) out[i] = static_cast<uint8_t>(codes[i]);
    } else if (elem.bits == 4) {
      for (int64_t j = 0; j < block / 2; ++j) out[j] = static_cast<uint8_t>(codes[2 * j] | codes[2 * j + 1] << 4);
    } else {  // FP6: 4 elements in 3 bytes, the first in the low bits
      for (int64_t j = 0; j < block / 4; ++j) {
        const uint32_t word = codes[4 * j] | codes[4 * j + 1] << 6 | codes[4 * j + 2] << 12 | codes[4 * j + 3] << 18;
        out[3 * j] = word & 0xFF;
        out[3 * j + 1] = (word >> 8) & 0xFF;
        out[3 * j + 2] = (word >> 16) & 0xFF;
      }
    }
    out[elem_bytes] = static_cast<uint8_t>(scale_code);
  }
}

// Each (token, KV head) row of key and value to its slot's page (slot -1: padding, skipped), through
// ``write(src, dst, scale)`` with the row's scale (a scale per KV head, or one for all).
template <typename T, typename Write>
void for_each_row(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                  at::Tensor& value_cache, const at::Tensor& slot_mapping, const at::Tensor& k_scale,
                  const at::Tensor& v_scale, Write write) {
  const int64_t tokens = key.size(0), heads = key.size(1), page = key_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const float* ks = k_scale.data_ptr<float>();
  const float* vs = v_scale.data_ptr<float>();
  const int64_t k_heads = k_scale.numel() > 1, v_heads = v_scale.numel() > 1;
  auto* kc = static_cast<uint8_t*>(key_cache.data_ptr());
  auto* vc = static_cast<uint8_t*>(value_cache.data_ptr());
  const int64_t item = key_cache.element_size();  // the caches' strides are in elements, ``dst`` in bytes
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  at::parallel_for(0, tokens * heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t work = begin; work < end; ++work) {
      const int64_t t = work / heads, h = work % heads, slot = slots[t];
      if (slot < 0) continue;  // padding
      const int64_t blk = slot / page, r = slot % page;
      write(k + t * key.stride(0) + h * key.stride(1),
            kc + (blk * key_cache.stride(0) + r * key_cache.stride(1) + h * key_cache.stride(2)) * item, ks[k_heads * h]);
      write(v + t * value.stride(0) + h * value.stride(1),
            vc + (blk * value_cache.stride(0) + r * value_cache.stride(1) + h * value_cache.stride(2)) * item,
            vs[v_heads * h]);
    }
  });
}

template <typename T, typename F8>
void write_fp8_row(const T* src, uint8_t* dst, int64_t head_dim, float scale, float max_value) {
  for (int64_t d = 0; d < head_dim; ++d) {
    const float y = static_cast<float>(src[d]) / scale;
    // torch.clamp keeps NaN; min/max written so that it does here too.
    const float clamped = y < -max_value ? -max_value : (y > max_value ? max_value : y);
    dst[d] = F8(clamped).x;
  }
}

}  // namespace

void reshape_and_cache_block_scaled(at::Tensor key, at::Tensor value, at::Tensor key_cache,
                                    at::Tensor value_cache, at::Tensor slot_mapping, int64_t bits,
                                    int64_t mantissa_bits, int64_t bias, int64_t max_code, int64_t emax,
                                    double max_value, int64_t block, bool e8m0, at::Tensor k_scale,
                                    at::Tensor v_scale) {
  TORCH_CHECK(block <= 64, "block-scaled blocks of at most 64 elements");
  const Minifloat elem{bits, mantissa_bits, bias, max_code};
  const int64_t head_dim = key.size(2);
  const float limit = static_cast<float>(max_value);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "maia_cache_write", [&] {
    for_each_row<scalar_t>(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale,
                           [&](const scalar_t* src, uint8_t* dst, float scale) {
                             write_row(src, dst, head_dim, block, elem, emax, limit, e8m0, scale);
                           });
  });
}

void reshape_and_cache_fp8(at::Tensor key, at::Tensor value, at::Tensor key_cache, at::Tensor value_cache,
                           at::Tensor slot_mapping, bool e4m3, double max_value, at::Tensor k_scale,
                           at::Tensor v_scale) {
  const int64_t head_dim = key.size(2);
  const float limit = static_cast<float>(max_value);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "maia_fp8_write", [&] {
    auto row = e4m3 ? &write_fp8_row<scalar_t, c10::Float8_e4m3fn> : &write_fp8_row<scalar_t, c10::Float8_e5m2>;
    for_each_row<scalar_t>(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale,
                           [&](const scalar_t* src, uint8_t* dst, float scale) { row(src, dst, head_dim, scale, limit); });
  });
}

void reshape_and_cache_plain(at::Tensor key, at::Tensor value, at::Tensor key_cache, at::Tensor value_cache,
                             at::Tensor slot_mapping) {
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type(), "an unquantized cache of the rows' own dtype");
  const int64_t row_bytes = key.size(2) * key.element_size();
  const at::Tensor unscaled = at::ones({1}, at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "maia_plain_write", [&] {
    for_each_row<scalar_t>(key, value, key_cache, value_cache, slot_mapping, unscaled, unscaled,
                           [&](const scalar_t* src, uint8_t* dst, float) { std::memcpy(dst, src, row_bytes); });
  });
}
