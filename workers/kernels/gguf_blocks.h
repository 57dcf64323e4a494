// Products of float32 activations with weight rows held in GGUF's own blocks (Q4_K, Q6_K,
// Q8_0), for x86-64 with AVX2, FMA and F16C.
//
//     y[m, n] = sum_k x[m, k] * W[n, k]
//
// Why our own kernel: ONNX Runtime's MatMulNBits needs float32 scales and a separate
// product for Q4_K's minimums (6 bits read per 4.5-bit weight), and its one-row kernel
// rounds differently from its many-row one, so the worker padded every decode step to
// two rows. Here each row of x is quantized on its own (quantize_row) and every output
// element is one fixed sequence of integer and float operations over that row: the bits
// of row m do not depend on how many rows the call has or where m sits among them
// (tests/test_gguf_kernel.py checks it), so a decode step of one row is bit for bit the
// same row of a verification, and the weights are read at the file's size.
//
// Arithmetic as llama.cpp's K-quant dot products: int8 activations per block of 256,
// integer sums inside a block (maddubs/madd), float across blocks. Several rows of x share
// each unpacked block of weights (kRowGroup at a time) and columns are walked in tiles
// that stay in L2, so verification and prefill read the weights from memory once.
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace cosine_gguf {

enum class Format : int { kQ4K = 0, kQ6K = 1, kQ8_0 = 2 };

constexpr int kRowGroup = 4;  // rows of x sharing one unpacking of a weight block
constexpr int kPrefetch = 1024;  // bytes ahead of the block being read that are prefetched

struct FormatInfo {
  int block_elems;  // weights per block
  int block_bytes;  // bytes per block
};

inline FormatInfo info(Format f) {
  switch (f) {
    case Format::kQ4K: return {256, 144};
    case Format::kQ6K: return {256, 210};
    case Format::kQ8_0: return {32, 34};
  }
  return {0, 0};
}

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Each row of x is quantized as llama.cpp quantizes activations for its K-quant dot
// products: in blocks of 256, x ~ dx * xq with xq int8 in [-127, 127] and dx = max|x| / 127
// (rounded to nearest even), plus the integer sums of xq over each 32 (for Q4_K's
// minimums). Products are integer inside a block of 256 and float across blocks.
constexpr int kXBlock = 256;

struct Rows {
  const int8_t* q;  // [K]
  const float* scale;  // [K / 256]
  const int16_t* sums;  // [K / 32]
};

inline void quantize_row(const float* x, int64_t k, int8_t* q, float* scale, int16_t* sums) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < k / kXBlock; ++b) {
    const float* p = x + kXBlock * b;
    __m256 peak = _mm256_setzero_ps();
    for (int i = 0; i < kXBlock; i += 8) peak = _mm256_max_ps(peak, _mm256_andnot_ps(sign, _mm256_loadu_ps(p + i)));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(peak), _mm256_extractf128_ps(peak, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float amax = _mm_cvtss_f32(m);
    scale[b] = amax / 127.0f;
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    for (int j = 0; j < kXBlock / 32; ++j) {
      __m256i i32[4];
      for (int i = 0; i < 4; ++i) i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + 32 * j + 8 * i), inv));
      // 32 int32 -> 32 int8 in order (packs interleaves 128-bit lanes; the permute undoes it)
      __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
      bytes = _mm256_permutevar8x32_epi32(bytes, order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + kXBlock * b + 32 * j), bytes);
      const __m256i total = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), bytes), _mm256_set1_epi16(1));
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
      sums[b * 8 + j] = static_cast<int16_t>(_mm_cvtsi128_si32(t));
    }
  }
}

inline __m256i load32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline int hsum_i32(__m128i t) {
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  return _mm_cvtsi128_si32(t);
}

// Q4_K's 6-bit scales and minimums of its 8 sub-blocks, from 12 packed bytes: sc[0..3] and
// mn[0..3] are the low 6 bits of bytes 0..3 and 4..7; sc[4..7] and mn[4..7] take the low
// and high nibbles of bytes 8..11 plus the top 2 bits of bytes 0..3 and 4..7. Returned as
// bytes sc[0..7], mn[0..7] of one register (built in registers: a vector load of scalar
// stores would stall on store forwarding, once per block).
inline __m128i q4k_scales(const uint8_t* p) {
  uint32_t a, b, c;
  std::memcpy(&a, p, 4);
  std::memcpy(&b, p + 4, 4);
  std::memcpy(&c, p + 8, 4);
  const uint32_t sc0 = a & 0x3f3f3f3fu, mn0 = b & 0x3f3f3f3fu;
  const uint32_t sc1 = (c & 0x0f0f0f0fu) | (((a >> 6) & 0x03030303u) << 4);
  const uint32_t mn1 = ((c >> 4) & 0x0f0f0f0fu) | (((b >> 6) & 0x03030303u) << 4);
  return _mm_set_epi32(static_cast<int>(mn1), static_cast<int>(mn0), static_cast<int>(sc1), static_cast<int>(sc0));
}

// Q4_K: fp16 d and dmin, 12 bytes of 6-bit sub-block scales and minimums, 128 bytes of
// nibbles; w = d * sc * q - dmin * mn per 32-weight sub-block, q in 0..15.
template <int R>
inline void q4k_row(const uint8_t* w, int nblocks, const Rows* x, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  float minimum[R] = {};
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int b = 0; b < nblocks; ++b, w += 144) {
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + 128), _MM_HINT_T0);
    const float d = fp16(w), dmin = fp16(w + 2);
    const __m128i scales = q4k_scales(w + 4);
    // each sub-block's scale in all 16 int16 lanes: bytes (s, 0) repeated, picked by a shuffle
    const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scales));
    const __m128i mn16 = _mm_cvtepu8_epi16(_mm_srli_si128(scales, 8));
    __m256i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    const uint8_t* qs = w + 16;
    for (int j = 0; j < 4; ++j) {  // 64 weights: 32 low nibbles, then 32 high nibbles
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * j));
      const __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      const __m256i scale_lo = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16(static_cast<int16_t>(0x0100 + 0x0202 * (2 * j))));
      const __m256i scale_hi = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16(static_cast<int16_t>(0x0100 + 0x0202 * (2 * j + 1))));
      for (int r = 0; r < R; ++r) {
        const int8_t* xq = x[r].q + b * 256 + 64 * j;
        const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load32(xq)), scale_lo);
        const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load32(xq + 32)), scale_hi);
        isum[r] = _mm256_add_epi32(isum[r], _mm256_add_epi32(p0, p1));
      }
    }
    for (int r = 0; r < R; ++r) {
      const float dx = x[r].scale[b];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * dx), acc[r]);
      const __m128i bs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[r].sums + b * 8));
      minimum[r] += dmin * dx * static_cast<float>(hsum_i32(_mm_madd_epi16(mn16, bs)));
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) - minimum[r];
}

// signed weights times int8 x: |w| times x with w's sign, pairwise into int16
inline __m256i sdot16(__m256i w_abs, __m256i w, __m256i x) {
  return _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(x, w));
}

// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (one per 16
// weights), fp16 d; w = d * scale * (q - 32), q in 0..63.
template <int R>
inline void q6k_row(const uint8_t* w, int nblocks, const Rows* x, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
  // for each 32 weights, the bytes of their two scales, each repeated 8 times (one per lane)
  alignas(16) static const int8_t pick[8][16] = {
      {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},         {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
      {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},         {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
      {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},         {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
      {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13},
      {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15}};
  for (int b = 0; b < nblocks; ++b, w += 210) {
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + 128), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + 192), _MM_HINT_T0);
    const float d = fp16(w + 208);
    const __m128i scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 192));
    __m256i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {  // two halves of 128 weights
      const uint8_t* ql = w + 64 * h;
      const uint8_t* qh = w + 128 + 32 * h;
      const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
      const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
      const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
      __m256i q[4];
      q[0] = _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_slli_epi16(_mm256_and_si256(hb, two), 4));
      q[1] = _mm256_or_si256(_mm256_and_si256(l1, low4),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), two), 4));
      q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), two), 4));
      q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), two), 4));
      for (int part = 0; part < 4; ++part) {  // 32 weights, two scales of 16 (one per 128-bit lane)
        const __m256i v = _mm256_sub_epi8(q[part], bias), v_abs = _mm256_sign_epi8(v, v);
        const __m256i sc = _mm256_cvtepi8_epi16(
            _mm_shuffle_epi8(scales, _mm_load_si128(reinterpret_cast<const __m128i*>(pick[4 * h + part]))));
        for (int r = 0; r < R; ++r) {
          const __m256i xq = load32(x[r].q + b * 256 + 128 * h + 32 * part);
          isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(sdot16(v_abs, v, xq), sc));
        }
      }
    }
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * x[r].scale[b]), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

// Q8_0: fp16 d, 32 int8; w = d * q.
template <int R>
inline void q8_0_row(const uint8_t* w, int nblocks, const Rows* x, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int b = 0; b < nblocks; ++b, w += 34) {
    const float d = fp16(w);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2)), v_abs = _mm256_sign_epi8(v, v);
    for (int r = 0; r < R; ++r) {
      const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(sdot16(v_abs, v, load32(x[r].q + 32 * b)), ones));
      acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * x[r].scale[b / 8]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

template <int R>
inline void row_dot(Format f, const uint8_t* w, int nblocks, const Rows* x, float* out) {
  switch (f) {
    case Format::kQ4K: q4k_row<R>(w, nblocks, x, out); break;
    case Format::kQ6K: q6k_row<R>(w, nblocks, x, out); break;
    case Format::kQ8_0: q8_0_row<R>(w, nblocks, x, out); break;
  }
}

// Output columns [n0, n1) of y [M, N] for quantized rows x (quantize_row), W [N, K /
// block_elems * block_bytes].
inline void matmul_columns(Format f, const Rows* x, const uint8_t* w, float* y, int64_t m, int64_t n, int64_t k,
                           int64_t n0, int64_t n1) {
  const FormatInfo fi = info(f);
  const int nblocks = static_cast<int>(k / fi.block_elems);
  const int64_t row_bytes = static_cast<int64_t>(nblocks) * fi.block_bytes;
  // columns in tiles that stay in L2 while every group of rows passes over them, so the
  // weights are read from memory once per call
  const int64_t tile = row_bytes * 16 <= (256 << 10) ? 16 : 4;
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = t0 + tile < n1 ? t0 + tile : n1;
    for (int64_t r0 = 0; r0 < m; r0 += kRowGroup) {
      const int rows = static_cast<int>(m - r0 < kRowGroup ? m - r0 : kRowGroup);
      float out[kRowGroup];
      for (int64_t c = t0; c < t1; ++c) {
        const uint8_t* wr = w + c * row_bytes;
        switch (rows) {
          case 4: row_dot<4>(f, wr, nblocks, x + r0, out); break;
          case 3: row_dot<3>(f, wr, nblocks, x + r0, out); break;
          case 2: row_dot<2>(f, wr, nblocks, x + r0, out); break;
          default: row_dot<1>(f, wr, nblocks, x + r0, out); break;
        }
        for (int r = 0; r < rows; ++r) y[(r0 + r) * n + c] = out[r];
      }
    }
  }
}

}  // namespace cosine_gguf
