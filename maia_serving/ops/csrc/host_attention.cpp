// Paged attention on a CPU host in one call per layer: each KV row is decoded while it is read
// (BF16/FP16/FP32 as they are, FP8 and FP4 16 at a time through FP16 where the CPU has F16C, else FP8
// in arithmetic and FP4 through the pair tables the Python side builds from the references, FP6
// through its pair tables: decoded values are the references' bit for bit), and every query of the row's KV head meets it with an online softmax. Threads split the
// (sequence, KV head) pairs. Numerics: float32 scores, softmax and accumulation, as the torch
// path; the sums run in another order, so results agree to float32 rounding, not bit for bit.
// ATen's core headers and the operator registry, not <torch/extension.h> (with pybind11 and torch's Python
// bindings, about 30 s of compile for each file): the entry points are operators, called as torch.ops.maia_host.*.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define MAIA_F16C 1
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

enum Kind : int64_t { kPlain = 0, kFp8E4M3 = 1, kBlockScaled = 2, kFp8E5M2 = 3 };
constexpr int64_t kTile = 32;  // keys decoded at a time, each met by every query that sees it

// A dot product in 8 independent lanes, which the compiler vectorizes without reordering any lane's sum.
inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int k = 0; k < 8; ++k) lanes[k] += a[d + k] * b[d + k];
  float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

struct Layout {
  int64_t kind, head_dim, row_elems, bits, block, block_bytes;
  const float* elements;  // kBlockScaled FP6/FP4: element pairs [2^(2 bits)][2] (FP8 elements are E4M3)
  const float* scales;    // kBlockScaled: the 256 block-scale values
  bool fp4_tops = false;  // FP4 elements decoded through fp4_top (every code's value is FP16 with a zero low byte)
  uint8_t fp4_top[16] = {};
};

template <typename T>
inline void decode_plain(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// FP8 codes' values as torch converts them, in integer arithmetic and masks the compiler vectorizes
// (a table lookup per element cost three times BF16's decode; a branch or a select on floats keeps
// the loop scalar): a normal code's exponent and mantissa moved into float32's fields and rebiased, a
// subnormal's mantissa times its step; NaN codes (E4M3 0x7F, E5M2 exponent 31 with a mantissa) NaN,
// E5M2's infinities infinite, the sign bit carried.
inline uint32_t mask_if(bool condition) { return 0u - static_cast<uint32_t>(condition); }

inline float from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline uint32_t to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float e4m3(uint32_t code) {
  const uint32_t mag = code & 0x7F, normal = mask_if(mag > 7), nan = mask_if(mag == 0x7F);
  const uint32_t subnormal = to_bits(static_cast<float>(static_cast<int32_t>(mag & 7)) * 0x1p-9f);
  uint32_t bits = (((mag << 20) + (120u << 23)) & normal) | (subnormal & ~normal);
  bits = (0x7FC00000u & nan) | (bits & ~nan);
  return from_bits(bits | (code & 0x80) << 24);
}

inline float e5m2(uint32_t code) {
  const uint32_t mag = code & 0x7F, normal = mask_if(mag > 3), special = mask_if(mag >= 0x7C);
  const uint32_t subnormal = to_bits(static_cast<float>(static_cast<int32_t>(mag & 3)) * 0x1p-16f);
  uint32_t bits = (((mag << 21) + (112u << 23)) & normal) | (subnormal & ~normal);
  const uint32_t inf_or_nan = mag == 0x7C ? 0x7F800000u : 0x7FC00000u;
  bits = (inf_or_nan & special) | (bits & ~special);
  return from_bits(bits | (code & 0x80) << 24);
}

#ifdef MAIA_F16C
// Where the CPU converts FP16 (F16C), 8-bit and 4-bit codes are decoded 16 at a time through FP16,
// which holds every E4M3, E5M2 and E2M1 value exactly: E5M2 is FP16's top byte; E4M3's exponent and
// mantissa shifted into FP16's fields are its value times 2^-8, subnormals included (FP16 has 5
// exponent bits to E4M3's 4), so a multiply by 2^8 gives it back exactly; E2M1 values' FP16 codes have
// a zero low byte, so a 16-entry byte shuffle looks up their top bytes. Same floats as the scalar code.
inline void store_f16(__m128i halves, float* dst, float mul) {
  _mm256_storeu_ps(dst, _mm256_mul_ps(_mm256_cvtph_ps(halves), _mm256_set1_ps(mul)));
}

template <bool E4M3>
inline void decode_fp8_x16(const uint8_t* src, float* dst) {
  const __m256i code = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  __m256i half;
  if (E4M3) {
    const __m256i mag = _mm256_and_si256(code, _mm256_set1_epi16(0x7F));
    const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(code, _mm256_set1_epi16(0x80)), 8);
    const __m256i nan = _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7F));  // 0x7F: NaN, not 480
    half = _mm256_or_si256(sign, _mm256_blendv_epi8(_mm256_slli_epi16(mag, 7), _mm256_set1_epi16(0x7E00), nan));
  } else {
    half = _mm256_slli_epi16(code, 8);
  }
  const float mul = E4M3 ? 256.0f : 1.0f;
  store_f16(_mm256_castsi256_si128(half), dst, mul);
  store_f16(_mm256_extracti128_si256(half, 1), dst + 8, mul);
}

// 8 bytes of E2M1 pairs (low nibble first) -> 16 floats times mul; `top` maps a code to its FP16 top byte.
inline void decode_fp4_x16(const uint8_t* src, float* dst, __m128i top, float mul) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_shuffle_epi8(top, _mm_and_si128(bytes, nib));
  const __m128i hi = _mm_shuffle_epi8(top, _mm_and_si128(_mm_srli_epi16(bytes, 4), nib));
  const __m128i tops = _mm_unpacklo_epi8(lo, hi), zero = _mm_setzero_si128();
  store_f16(_mm_unpacklo_epi8(zero, tops), dst, mul);
  store_f16(_mm_unpackhi_epi8(zero, tops), dst + 8, mul);
}
#endif

template <bool E4M3>
inline void decode_fp8(const uint8_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef MAIA_F16C
  for (; i + 16 <= n; i += 16) decode_fp8_x16<E4M3>(src + i, dst + i);
#endif
  for (; i < n; ++i) dst[i] = E4M3 ? e4m3(src[i]) : e5m2(src[i]);
}

// One head's row of a block-scaled page: blocks of element bytes then a scale byte; the elements
// times the block's scale (times NVFP4's tensor scale, applied to the block scale first).
inline void decode_block_scaled(const uint8_t* src, float* dst, const Layout& f, float tensor_scale) {
  float tmp[64];
  const int64_t blocks = (f.head_dim + f.block - 1) / f.block;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* p = src + b * f.block_bytes;
    const float s = f.scales[p[f.block_bytes - 1]] * tensor_scale;
    if (f.bits == 8) {
      decode_fp8<true>(p, tmp, f.block);
#ifdef MAIA_F16C
    } else if (f.fp4_tops && f.block % 16 == 0 && (b + 1) * f.block <= f.head_dim) {  // a whole block
      const __m128i top = _mm_loadu_si128(reinterpret_cast<const __m128i*>(f.fp4_top));
      for (int64_t j = 0; j < f.block; j += 16) decode_fp4_x16(p + j / 2, dst + b * f.block + j, top, s);
      continue;
#endif
    } else if (f.bits == 4) {
      for (int64_t j = 0; j < f.block / 2; ++j) {
        const float* pair = f.elements + 2 * p[j];
        tmp[2 * j] = pair[0];
        tmp[2 * j + 1] = pair[1];
      }
    } else {  // FP6: 4 elements in 3 bytes, two 12-bit pairs
      for (int64_t j = 0; j < f.block / 4; ++j) {
        const uint32_t b0 = p[3 * j], b1 = p[3 * j + 1], b2 = p[3 * j + 2];
        const float* lo = f.elements + 2 * (b0 | (b1 & 0xF) << 8);
        const float* hi = f.elements + 2 * (b1 >> 4 | b2 << 4);
        tmp[4 * j] = lo[0];
        tmp[4 * j + 1] = lo[1];
        tmp[4 * j + 2] = hi[0];
        tmp[4 * j + 3] = hi[1];
      }
    }
    const int64_t n = std::min(f.block, f.head_dim - b * f.block);
    for (int64_t i = 0; i < n; ++i) dst[b * f.block + i] = tmp[i] * s;
  }
}

// The FP16 top byte of each FP4 code's value, read from the pair table (a byte whose high nibble is
// zero holds its low nibble's value first); false if some value is not FP16 with a zero low byte.
inline bool fp4_tops(const float* pairs, uint8_t* top) {
#ifdef MAIA_F16C
  for (int code = 0; code < 16; ++code) {
    const float value = pairs[2 * code];
    const uint16_t half = _cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT);
    if ((half & 0xFF) || _cvtsh_ss(half) != value || std::signbit(_cvtsh_ss(half)) != std::signbit(value))
      return false;
    top[code] = static_cast<uint8_t>(half >> 8);
  }
  return true;
#else
  (void)pairs;
  (void)top;
  return false;
#endif
}

template <typename T>
void attend(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
            const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
            const at::Tensor& query_start_loc, double scale, const Layout& f, const at::Tensor& k_scale,
            const at::Tensor& v_scale, bool causal, int64_t window) {
  const int64_t num_seqs = seq_lens.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t kv_heads = key_cache.size(2), page = key_cache.size(1), group = num_heads / kv_heads;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t table_stride = block_tables.stride(0);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* starts = query_start_loc.data_ptr<int64_t>();
  const float* ks = k_scale.data_ptr<float>();
  const float* vs = v_scale.data_ptr<float>();
  const int64_t k_heads = k_scale.numel() > 1, v_heads = v_scale.numel() > 1;  // 1: a scale per KV head
  const bool fp8 = f.kind == kFp8E4M3 || f.kind == kFp8E5M2;  // scales applied to scores and output
  const T* q_data = query.data_ptr<T>();
  T* o_data = out.data_ptr<T>();
  const int64_t q_tok = query.stride(0), q_head = query.stride(1), o_tok = out.stride(0), o_head = out.stride(1);
  const auto* k_bytes = static_cast<const uint8_t*>(key_cache.data_ptr());
  const auto* v_bytes = static_cast<const uint8_t*>(value_cache.data_ptr());
  const int64_t item = key_cache.element_size();
  const int64_t kb = key_cache.stride(0) * item, kt = key_cache.stride(1) * item, kh = key_cache.stride(2) * item;
  const int64_t vb = value_cache.stride(0) * item, vt = value_cache.stride(1) * item,
                vh = value_cache.stride(2) * item;

  at::parallel_for(0, num_seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ktile(kTile * head_dim), vtile(kTile * head_dim), scores(kTile), q, acc, m, l;
    for (int64_t work = begin; work < end; ++work) {
      const int64_t s = work / kv_heads, h = work % kv_heads;
      const int64_t len = lens[s], q0 = starts[s], q_len = starts[s + 1] - q0;
      if (q_len <= 0 || len <= 0) continue;
      const int64_t rows = q_len * group;
      const float k_sc = ks[k_heads * h], v_sc = vs[v_heads * h];
      const float score_scale = static_cast<float>(scale) * (fp8 ? k_sc : 1.0f);
      q.assign(rows * head_dim, 0.0f);
      acc.assign(rows * head_dim, 0.0f);
      m.assign(rows, -std::numeric_limits<float>::infinity());
      l.assign(rows, 0.0f);
      for (int64_t r = 0; r < q_len; ++r)
        for (int64_t g = 0; g < group; ++g) {
          const T* src = q_data + (q0 + r) * q_tok + (h * group + g) * q_head;
          for (int64_t d = 0; d < head_dim; ++d) q[(r * group + g) * head_dim + d] = static_cast<float>(src[d]);
        }
      // Keys any query of this sequence sees: the first query's window start to the last position.
      const int64_t first_pos = len - q_len;
      const int64_t lo = (causal && window > 0) ? std::max<int64_t>(0, first_pos - window + 1) : 0;
      for (int64_t t0 = lo; t0 < len; t0 += kTile) {
        const int64_t n = std::min<int64_t>(kTile, len - t0);
        // Page and row of each key stepped along (a 64-bit division per key would cost more than its decode).
        int64_t page_index = t0 / page, slot = t0 % page;
        for (int64_t j = 0; j < n; ++j, ++slot) {
          if (slot == page) {
            slot = 0;
            ++page_index;
          }
          const int64_t block = tables[s * table_stride + page_index];
          const uint8_t* kp = k_bytes + block * kb + slot * kt + h * kh;
          const uint8_t* vp = v_bytes + block * vb + slot * vt + h * vh;
          float* kr = ktile.data() + j * head_dim;
          float* vr = vtile.data() + j * head_dim;
          if (f.kind == kPlain) {
            decode_plain(reinterpret_cast<const T*>(kp), kr, head_dim);
            decode_plain(reinterpret_cast<const T*>(vp), vr, head_dim);
          } else if (f.kind == kFp8E4M3) {
            decode_fp8<true>(kp, kr, head_dim);
            decode_fp8<true>(vp, vr, head_dim);
          } else if (f.kind == kFp8E5M2) {
            decode_fp8<false>(kp, kr, head_dim);
            decode_fp8<false>(vp, vr, head_dim);
          } else {
            decode_block_scaled(kp, kr, f, k_sc);
            decode_block_scaled(vp, vr, f, v_sc);
          }
        }
        // Queries that see some key of the tile: positions t0 .. t0 + n - 1 + window - 1 (causal).
        int64_t r_lo = 0, r_hi = q_len;
        if (causal) {
          r_lo = std::max<int64_t>(0, t0 - first_pos);
          if (window > 0) r_hi = std::min<int64_t>(q_len, t0 + n - 1 + window - first_pos);
        }
        for (int64_t i = r_lo * group; i < r_hi * group; ++i) {
          const int64_t pos = first_pos + i / group;
          const float* qi = q.data() + i * head_dim;
          float tile_max = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j < n; ++j) {
            const int64_t t = t0 + j;
            const bool seen = !causal || (t <= pos && (window <= 0 || t > pos - window));
            scores[j] = seen ? dot(qi, ktile.data() + j * head_dim, head_dim) * score_scale
                             : -std::numeric_limits<float>::infinity();
            tile_max = std::max(tile_max, scores[j]);
          }
          if (tile_max == -std::numeric_limits<float>::infinity()) continue;
          const float new_max = std::max(m[i], tile_max);
          const float corr = std::exp(m[i] - new_max);  // 0 before the first key
          float* a = acc.data() + i * head_dim;
          float sum = l[i] * corr;
          for (int64_t d = 0; d < head_dim; ++d) a[d] *= corr;
          for (int64_t j = 0; j < n; ++j) {
            if (scores[j] == -std::numeric_limits<float>::infinity()) continue;
            const float p = std::exp(scores[j] - new_max);
            sum += p;
            const float* vr = vtile.data() + j * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) a[d] += p * vr[d];
          }
          l[i] = sum;
          m[i] = new_max;
        }
      }
      const float out_scale = fp8 ? v_sc : 1.0f;
      for (int64_t r = 0; r < q_len; ++r)
        for (int64_t g = 0; g < group; ++g) {
          const int64_t i = r * group + g;
          T* dst = o_data + (q0 + r) * o_tok + (h * group + g) * o_head;
          const float norm = l[i] > 0.0f ? out_scale / l[i] : 0.0f;
          for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<T>(acc[i * head_dim + d] * norm);
        }
    }
  });
}

}  // namespace

void paged_attention(at::Tensor out, at::Tensor query, at::Tensor key_cache, at::Tensor value_cache,
                     at::Tensor block_tables, at::Tensor seq_lens, at::Tensor query_start_loc, double scale,
                     int64_t kind, int64_t bits, int64_t block, int64_t block_bytes, at::Tensor elements,
                     at::Tensor scales, at::Tensor k_scale, at::Tensor v_scale, bool causal,
                     int64_t window) {
  TORCH_CHECK(block <= 64, "block-scaled blocks of at most 64 elements");
#ifdef _OPENMP
  // This library's OpenMP runtime may not be torch's: use as many threads as torch was told to.
  omp_set_num_threads(at::get_num_threads());
#endif
  Layout f{kind, query.size(2), key_cache.size(3), bits, block, block_bytes,
           elements.numel() ? elements.data_ptr<float>() : nullptr,
           scales.numel() ? scales.data_ptr<float>() : nullptr};
  if (kind == kBlockScaled && bits == 4) f.fp4_tops = fp4_tops(f.elements, f.fp4_top);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "maia_paged_attention", [&] {
    attend<scalar_t>(out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, f, k_scale,
                     v_scale, causal, window);
  });
}

// cache_write.cpp
void reshape_and_cache_block_scaled(at::Tensor key, at::Tensor value, at::Tensor key_cache,
                                    at::Tensor value_cache, at::Tensor slot_mapping, int64_t bits,
                                    int64_t mantissa_bits, int64_t bias, int64_t max_code, int64_t emax,
                                    double max_value, int64_t block, bool e8m0, at::Tensor k_scale,
                                    at::Tensor v_scale);
void reshape_and_cache_fp8(at::Tensor key, at::Tensor value, at::Tensor key_cache, at::Tensor value_cache,
                           at::Tensor slot_mapping, bool e4m3, double max_value, at::Tensor k_scale,
                           at::Tensor v_scale);

void reshape_and_cache_plain(at::Tensor key, at::Tensor value, at::Tensor key_cache, at::Tensor value_cache,
                             at::Tensor slot_mapping);

// Schemas name what each writes (Tensor(a!)): out, and the caches.
TORCH_LIBRARY(maia_host, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor seq_lens, Tensor query_start_loc, float scale, int kind, int bits, int block, int block_bytes, "
      "Tensor elements, Tensor scales, Tensor k_scale, Tensor v_scale, bool causal, int window) -> ()",
      &paged_attention);
  m.def(
      "reshape_and_cache_block_scaled(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping, int bits, int mantissa_bits, int bias, int max_code, int emax, float max_value, "
      "int block, bool e8m0, Tensor k_scale, Tensor v_scale) -> ()",
      &reshape_and_cache_block_scaled);
  m.def(
      "reshape_and_cache_fp8(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping, bool e4m3, float max_value, Tensor k_scale, Tensor v_scale) -> ()",
      &reshape_and_cache_fp8);
  m.def(
      "reshape_and_cache_plain(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping) -> ()",
      &reshape_and_cache_plain);
}
