/* y = x · Wᵀ for a few rows of x against a weight W kept in ggml's block formats: the decode step of a
 * quantized model (gemma3/accel/quantize.py), plus the dequantization its prefill GEMM and embedding lookups use.
 *
 * Formats (ggml's, byte for byte, so a GGUF file's tensors are used as they are in the file). Each row of W
 * is K/QK blocks; a value is (code - offset) · d, or code · d - min for the ones with a min:
 *   Q8_0  32 values  34 bytes  f16 d, 32 × int8
 *   Q4_0  32 values  18 bytes  f16 d, 16 bytes of nibbles (value j < 16: low nibble of byte j, else the high
 *                              nibble of byte j - 16), offset 8
 *   Q4_1  32 values  20 bytes  f16 d, f16 m, nibbles as Q4_0; value = code · d + m
 *   Q5_0  32 values  22 bytes  f16 d, u32 of fifth bits (bit j for value j), nibbles as Q4_0, offset 16
 *   Q4_K 256 values 144 bytes  f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes of
 *                              nibbles: sub-block 2c in the low nibbles of bytes 32c..32c+31, 2c+1 the high;
 *                              value = code · d · sc[j] - dmin · mn[j]
 *   Q6_K 256 values 210 bytes  128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (one per 16
 *                              values), f16 d; offset 32 (layout spelled out at unpack_q6_k)
 *
 * The activation. llama.cpp rounds x to int8 per block of 32 (its Q8_0 / Q8_K) and multiplies bytes with
 * VPMADDUBSW / VPDPBUSD, which moves its perplexity on the embedded Q4_K_M file measurably off the exact value
 * of the same weights (docs/quantized-inference.md, "Accuracy"). Here x is rounded to int16 per block of 32
 * instead (scale = max|x| / 32639, a relative error ~1.5e-5 of the block's largest value, 256× finer), and the
 * products stay exact in integers:
 *   - Q8_0 (and every format in the AVX2 build): the weights are widened to int16 in registers and VPMADDWD /
 *     VPDPWSSD multiply 16 or 32 pairs, adding neighbours into int32.
 *   - the 4-, 5- and 6-bit formats with AVX-512 VNNI: the code splits into two signed bytes, 256 · hi + lo,
 *     and VPDPBUSD multiplies them with the weights' unsigned codes, two groups a register (see bytes_fma).
 *     The widening was what bounded these products (docs/quantized-inference.md, "The kernel").
 * Each 32-value group's int32 sum is converted to fp32 once and scaled by (weight scale · activation scale),
 * so the only roundings are x's and the fp32 sums over groups.
 *
 * Overflow: |code| ≤ 127 (Q8_0) and |x| ≤ 32639, two or four products per int32 lane per group: < 2^26 · 4;
 * Q6_K multiplies its int8 sub-scale into the int16 weight first (|32 · 128| = 4096, so < 2^31 still) on the
 * int16 route; the byte route's lanes stay below 4 · 63 · 32639 < 2^24, exact in fp32 too.
 * Non-finite input: a block of x holding NaN or ±inf gets a NaN scale, so its outputs are NaN, never a
 * silently finite number; NaN or inf scales in W propagate the same way.
 *
 * Rows of x: 1..MAX_ROWS per call; each 32-value group of W is unpacked once and used for every row, so a
 * small batch reads the weights once. Threads (OpenMP) take contiguous ranges of W's rows; each output is
 * summed by one thread in a fixed order, so 1 and 2 threads give the same bits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include <omp.h>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "needs AVX2, FMA and F16C (x86-64-v3)"
#endif

#define MAX_ROWS 8

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define BYTE_PRODUCTS 1 /* the 4-, 5- and 6-bit formats multiply bytes (see bytes_fma); Q8_0 and AVX2 int16 */
#else
#define BYTE_PRODUCTS 0
#endif
#define QK 32 /* values per activation block, and per group of every weight format */

enum { F_Q8_0 = 8, F_Q4_0 = 2, F_Q4_1 = 3, F_Q5_0 = 6, F_Q4_K = 12, F_Q6_K = 14 }; /* ggml type ids */

static inline float f16(const uint8_t *p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

int64_t gemma3_q_block_values(int fmt) {
  switch (fmt) {
    case F_Q8_0: case F_Q4_0: case F_Q4_1: case F_Q5_0: return 32;
    case F_Q4_K: case F_Q6_K: return 256;
    default: return 0;
  }
}

/* static and inline for the products: the exported gemma3_q_block_bytes is called through the PLT (the library
 * is built with -fPIC, so it could be interposed), and a call in a product's loop made the compiler save and
 * restore every vector register around it (all are caller-saved): that was a third of a Q4_0 / Q4_1 / Q5_0
 * product's time (docs/performance.md, "Batched decode steps"). */
static inline int64_t block_bytes(int fmt) {
  switch (fmt) {
    case F_Q8_0: return 34;
    case F_Q4_0: return 18;
    case F_Q4_1: return 20;
    case F_Q5_0: return 22;
    case F_Q4_K: return 144;
    case F_Q6_K: return 210;
    default: return 0;
  }
}

int64_t gemma3_q_block_bytes(int fmt) { return block_bytes(fmt); }

int gemma3_q_max_rows(void) { return MAX_ROWS; }

/* ------------------------------------------------------------------------------------------ activation */
/* The largest |code|: 127 · 256 + 127, so that a code splits into two signed bytes, code = 256 · hi + lo with
 * hi, lo in [-127, 127] (the AVX-512 VNNI byte products below); the rounding is 1/65278 of the block's largest
 * value instead of int16's 1/65534. */
#define CODE_MAX 32639

/* One row of x (K values, K a multiple of 32) → int16 codes, a scale per block, and the block's sum in fp32
 * (scale · Σ codes: what the formats with a min multiply it by). */
static void quantize_row(const float *x, int64_t K, int16_t *q, float *d, float *sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < K / QK; b++) {
    const float *xb = x + b * QK;
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    float mx = _mm_cvtss_f32(m);
    int finite = 1; /* max_ps drops NaN; look for it (and inf) directly */
    for (int i = 0; i < QK; i++) finite &= isfinite(xb[i]);
    if (!finite || mx == 0.0f) {
      memset(q + b * QK, 0, QK * sizeof(int16_t));
      d[b] = finite ? 0.0f : NAN;
      sum[b] = finite ? 0.0f : NAN;
      continue;
    }
    float scale = mx / (float)CODE_MAX;
    __m256 inv = _mm256_set1_ps((float)CODE_MAX / mx);
    __m256i c[4], total = _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {
      c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)); /* nearest, ties to even */
      total = _mm256_add_epi32(total, c[i]);
    }
    /* packs works within 128-bit lanes: (a0-3 b0-3 a4-7 b4-7) → permute the 64-bit quarters back in order */
    __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0xD8);
    __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(c[2], c[3]), 0xD8);
    _mm256_storeu_si256((__m256i *)(q + b * QK), lo);
    _mm256_storeu_si256((__m256i *)(q + b * QK + 16), hi);
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    d[b] = scale;
    sum[b] = scale * (float)_mm_cvtsi128_si32(t);
  }
}

/* The codes in value order as two signed bytes each (code = 256 · hi + lo), and each 16 values' sum
 * scale · Σ codes (Q6_K's offset is per 16 values). Plain loops: the compiler vectorises them. */
static void split_row(const int16_t *q, const float *d, int64_t K, int8_t *hi, int8_t *lo, float *sum16) {
  for (int64_t i = 0; i < K; i++) {
    int h = (q[i] + 128) >> 8; /* arithmetic shift: floor */
    hi[i] = (int8_t)h;
    lo[i] = (int8_t)(q[i] - 256 * h);
  }
  for (int64_t s = 0; s < K / 16; s++) {
    int32_t total = 0;
    for (int i = 0; i < 16; i++) total += q[16 * s + i];
    sum16[s] = d[s / 2] * (float)total; /* NaN for a non-finite block, as d */
  }
}

typedef struct {
  const int16_t *q; /* (M, K) codes, in the order the int16 products read them (order_codes) */
  const float *d, *sum; /* (M, K/32) */
  int64_t K, G;    /* values per row, groups per row */
  const int8_t *hi, *lo; /* (M, K) the codes as bytes, value order (the AVX-512 VNNI byte products) */
  const float *sum16;    /* (M, K/16) */
} act_t;

static void order_codes(int16_t *q, int64_t K);

/* The prepared activation of M rows lives in one buffer of act_bytes(M, K) bytes: act_t, then its arrays. */
static size_t act_bytes(int64_t M, int64_t K) {
  return sizeof(act_t) + (size_t)(M * K) * (sizeof(int16_t) + 2) + (size_t)(M * (K / QK)) * 2 * sizeof(float) +
         (size_t)(M * (K / 16)) * sizeof(float) + 64;
}

static const act_t *act_build(const float *x, int64_t M, int64_t K, void *mem) {
  act_t *a = mem;
  int64_t G = K / QK;
  int16_t *q = (int16_t *)(a + 1);
  float *d = (float *)(q + M * K), *s = d + M * G, *s16 = s + M * G;
  int8_t *hi = (int8_t *)(s16 + M * (K / 16)), *lo = hi + M * K;
  for (int64_t m = 0; m < M; m++) {
    quantize_row(x + m * K, K, q + m * K, d + m * G, s + m * G);
    if (BYTE_PRODUCTS) split_row(q + m * K, d + m * G, K, hi + m * K, lo + m * K, s16 + m * (K / 16));
    order_codes(q + m * K, K);
  }
  act_t v = {q, d, s, K, G, hi, lo, s16};
  *a = v;
  return a;
}

/* The sum of the 8 lanes of an AVX2 accumulator. */
static inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* ------------------------------------------------------------------------------------------ unpacking */
/* Every format's 32-value group unpacks to one vector of 32 signed bytes in value order, offset removed
 * (Q6_K's sub-scales are applied after). The product then splits it into its even and odd bytes as int16
 * with two shifts each (no cross-lane shuffle, which this CPU family runs on fewer ports), and the
 * activation's codes are stored in the matching order, evens then odds (see order_codes); the AVX-512 build
 * widens in value order instead (see widen_w). */
typedef struct { __m256i a, b; } w16_t;

static inline __m128i low_nibbles(__m128i v) { return _mm_and_si128(v, _mm_set1_epi8(15)); }
static inline __m128i high_nibbles(__m128i v) { return _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15)); }

/* Value j < 16 is byte j's low nibble, j >= 16 byte j - 16's high nibble: the 16 bytes in both halves,
 * the upper half shifted right by 4 (a per-dword variable shift), then masked. */
static inline __m256i nibbles_32(const uint8_t *qs) {
  __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
  v = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
  return _mm256_and_si256(v, _mm256_set1_epi8(15));
}

/* 32 bits → 32 bytes, 0xFF where bit j is set: byte j takes byte j/8 of the word (shuffle), every bit but
 * bit j % 8 is forced on (or), and the byte is all ones exactly when bit j was set (compare). */
static inline __m256i bytes_from_bits(uint32_t bits) {
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits),
                                  _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101,
                                                     0x0202020202020202, 0x0303030303030303));
  v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1));
}

static inline __m256i unpack_q8_0(const uint8_t *blk) { return _mm256_loadu_si256((const __m256i *)(blk + 2)); }

static inline __m256i unpack_q4_0(const uint8_t *qs, int offset) { /* Q4_0 (offset 8), Q4_1 (offset 0) */
  return _mm256_sub_epi8(nibbles_32(qs), _mm256_set1_epi8((char)offset));
}

/* Q5_0: code = nibble + 16 · fifth bit, value = code - 16. As a signed byte that is the nibble itself where
 * the bit is set, and nibble | 0xF0 (nibble - 16) where it is not: one and-not and one or. */
static inline __m256i unpack_q5_0(const uint8_t *blk) {
  uint32_t bits;
  memcpy(&bits, blk + 2, 4);
  __m256i high = _mm256_andnot_si256(bytes_from_bits(bits), _mm256_set1_epi8((char)0xF0));
  return _mm256_or_si256(nibbles_32(blk + 6), high);
}

/* Q4_K: chunk c (0..3) of a super-block holds sub-blocks 2c (low nibbles) and 2c + 1 (high) in 32 bytes. */
static inline __m256i unpack_q4_k(const uint8_t *blk, int j) {
  __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * (j / 2)));
  if (j % 2) v = _mm256_srli_epi16(v, 4);
  return _mm256_and_si256(v, _mm256_set1_epi8(15));
}

/* All 8 sub-blocks' scales (d · sc_j, to `scale`) and mins (dmin · mn_j, as a vector) of one Q4_K super-block
 * at once: the 12 scale bytes as three words u0 u1 u2, where byte j of u0 / u1 holds sc_j / mn_j (j < 4) in
 * its low 6 bits and bits 4-5 of sc_{j+4} / mn_{j+4} in its top 2, and byte j of u2 the low 4 bits of sc_{j+4}
 * (low nibble) and mn_{j+4} (high nibble) — ggml's get_scale_min_k4, 8 sub-blocks at a time. */
static inline void q4_k_scales_mins(const uint8_t *blk, float *scale, __m256 *mins) {
  uint32_t u[3], sc[2], mn[2];
  memcpy(u, blk + 4, 12);
  sc[0] = u[0] & 0x3f3f3f3f;
  mn[0] = u[1] & 0x3f3f3f3f;
  sc[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
  mn[1] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
  __m128i s8 = _mm_set_epi32(0, 0, (int)sc[1], (int)sc[0]), m8 = _mm_set_epi32(0, 0, (int)mn[1], (int)mn[0]);
  _mm256_storeu_ps(scale, _mm256_mul_ps(_mm256_set1_ps(f16(blk)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(s8))));
  *mins = _mm256_mul_ps(_mm256_set1_ps(f16(blk + 2)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m8)));
}

/* Q6_K: group g (0..7) of one 256-value super-block, codes - 32. Half h = g / 4 (128 values) reads
 * ql[64h..64h+63] and qh[32h..32h+31]; run r = g % 4 of that half is
 *   r 0: low nibbles of ql[0:32]  | bits 0-1 of qh       r 1: low nibbles of ql[32:64] | bits 2-3
 *   r 2: high nibbles of ql[0:32] | bits 4-5             r 3: high nibbles of ql[32:64] | bits 6-7
 * and each 16 values of a run have their own int8 scale: q6_k_scales. */
static inline __m256i unpack_q6_k(const uint8_t *blk, int g) {
  int h = g / 4, r = g % 4;
  __m256i l = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + (r & 1) * 32));
  __m256i hb = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
  if (r >= 2) l = _mm256_srli_epi16(l, 4);
  l = _mm256_and_si256(l, _mm256_set1_epi8(15));
  hb = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(2 * r)), _mm256_set1_epi8(3));
  return _mm256_sub_epi8(_mm256_or_si256(l, _mm256_slli_epi16(hb, 4)), _mm256_set1_epi8(32));
}

/* Group g's two sub-scales as int16: values 0-15 take the first, 16-31 the second. In both the even/odd
 * split (dot products) and the in-order widening (dequantization) those are the low and high 128-bit lanes. */
static inline __m256i q6_k_scales(const uint8_t *blk, int g) {
  const int8_t *sc = (const int8_t *)(blk + 192) + 2 * g;
  return _mm256_set_m128i(_mm_set1_epi16(sc[1]), _mm_set1_epi16(sc[0]));
}

/* ------------------------------------------------------------------------------------------ dot products */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* AVX-512 VNNI: a group's 32 signed bytes widen to 32 int16 in one register (VPMOVSXBW) in value order, and
 * VPDPWSSD multiplies them with the activation's 32 codes and adds pairs into 16 int32 lanes, exactly (two
 * products a lane). Half the instructions of the AVX2 route, which is what lets the Q8_0 head stream at about
 * the machine's read bandwidth (docs/performance.md, "Figures the source comments used to quote"). */
#define QUANTS_ISA 512
typedef __m512i wv_t;
typedef __m512 acc_t;
static inline wv_t widen_w(__m256i v) { return _mm512_cvtepi8_epi16(v); }
/* Q6_K's two sub-scales per group as lane factors: the products' lanes 0-7 hold values 0-15, lanes 8-15 values 16-31 */
static inline acc_t halves(float first, float second) {
  return _mm512_insertf32x8(_mm512_set1_ps(first), _mm256_set1_ps(second), 1);
}
static inline acc_t acc_zero(void) { return _mm512_setzero_ps(); }
static inline float acc_sum(acc_t a, acc_t b) { return _mm512_reduce_add_ps(_mm512_add_ps(a, b)); }
static void order_codes(int16_t *q, int64_t K) { (void)q; (void)K; } /* value order, as widen_w gives */

/* Σ over the group of w · x's codes, exact in int32 lanes, as floats */
static inline acc_t group_sum(wv_t w, const int16_t *xq) {
  return _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512((const void *)xq)));
}
static inline acc_t acc_set1(float v) { return _mm512_set1_ps(v); }
static inline acc_t acc_mul(acc_t a, acc_t b) { return _mm512_mul_ps(a, b); }
static inline acc_t acc_fma(acc_t a, acc_t b, acc_t c) { return _mm512_fmadd_ps(a, b, c); }
#else
#define QUANTS_ISA 2
typedef w16_t wv_t;
typedef __m256 acc_t;
static inline wv_t widen_w(__m256i v) { /* even and odd bytes as int16, two shifts each */
  w16_t w = {_mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8), _mm256_srai_epi16(v, 8)};
  return w;
}
/* Q6_K's two sub-scales per group as lane factors: with the even/odd split the products' lanes 0-3 hold values
 * 0-15 and lanes 4-7 values 16-31 */
static inline acc_t halves(float first, float second) { return _mm256_setr_m128(_mm_set1_ps(first), _mm_set1_ps(second)); }
static inline acc_t acc_zero(void) { return _mm256_setzero_ps(); }
static inline float acc_sum(acc_t a, acc_t b) { return hsum(_mm256_add_ps(a, b)); }

/* The activation's codes of each group, reordered to match widen_w: the 16 even values, then the 16 odd. */
static void order_codes(int16_t *q, int64_t K) {
  int16_t t[QK];
  for (int64_t b = 0; b < K; b += QK) {
    for (int i = 0; i < QK / 2; i++) {
      t[i] = q[b + 2 * i];
      t[QK / 2 + i] = q[b + 2 * i + 1];
    }
    memcpy(q + b, t, sizeof t);
  }
}

/* Σ over the group of w · x's codes, exact in int32 lanes, as floats */
static inline acc_t group_sum(wv_t w, const int16_t *xq) {
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(w.a, _mm256_loadu_si256((const __m256i *)xq)),
                                             _mm256_madd_epi16(w.b, _mm256_loadu_si256((const __m256i *)(xq + 16)))));
}
static inline acc_t acc_set1(float v) { return _mm256_set1_ps(v); }
static inline acc_t acc_mul(acc_t a, acc_t b) { return _mm256_mul_ps(a, b); }
static inline acc_t acc_fma(acc_t a, acc_t b, acc_t c) { return _mm256_fmadd_ps(a, b, c); }
#endif

int gemma3_q_isa(void) { return QUANTS_ISA; }

/* acc[m] += (Σ over the group of w · x_m) · scale · x_m's block scale, for every row m. */
static inline __attribute__((always_inline)) void group_fma(wv_t w, float scale, const act_t *x, int64_t g,
                                                            int M, acc_t *acc) {
  for (int m = 0; m < M; m++)
    acc[m] = acc_fma(group_sum(w, x->q + m * x->K + g * QK), acc_set1(scale * x->d[m * x->G + g]), acc[m]);
}

/* the same with a factor per lane (Q6_K's sub-scales) */
static inline __attribute__((always_inline)) void group_fma_lanes(wv_t w, acc_t lanes, float scale, const act_t *x,
                                                                  int64_t g, int M, acc_t *acc) {
  for (int m = 0; m < M; m++)
    acc[m] = acc_fma(group_sum(w, x->q + m * x->K + g * QK), acc_mul(lanes, acc_set1(scale * x->d[m * x->G + g])),
                     acc[m]);
}

#if BYTE_PRODUCTS
/* ------------------------------------------------------------------------------------------ byte products */
/* The formats whose codes are unsigned small integers (Q4_0, Q4_1, Q5_0: 0..31; Q4_K 0..15; Q6_K 0..63) skip
 * the int16 widening: two groups' 64 codes fill one register as bytes, and VPDPBUSD multiplies them with 64
 * signed bytes of x and adds each 4 products into an int32 lane. x's int16 code is 256 · hi + lo (split_row),
 * so  Σ u · code = 256 · Σ u · hi + Σ u · lo : two VPDPBUSD with a shift between, exactly (|lane| ≤ 4 · 63 ·
 * 32639 < 2^24, so its conversion to fp32 is exact too). Lanes 0-7 hold the first group, 8-15 the second; one
 * permute gives each lane its group's scale. A format's offset (Q4_0 8, Q5_0 16, Q6_K 32) or min is the group's
 * scale times the sum of x over the group, added once per row (`corr`). Why not the int16 route here: its
 * widening is what bounded the layers' products. The figures per format (benchmarks/bench_kernels.py), and the
 * variants of this loop tried and not kept: docs/performance.md, "Figures the source comments used to quote". */

/* acc[m] += (the lanes' exact sums of u · x_m's codes over values [32 g, 32 g + 64)) · lanes[m] for every
 * row m; `half` = only the first group (a row's last, odd group): x's second half is not read. */
static inline __attribute__((always_inline)) void bytes_fma(__m512i u, const act_t *x, int64_t g, int M,
                                                            const __m512 *lanes, __m512 *acc, int half) {
  for (int m = 0; m < M; m++) {
    const int8_t *hi = x->hi + m * x->K + g * QK, *lo = x->lo + m * x->K + g * QK;
    __m512i h = half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, hi) : _mm512_loadu_si512((const void *)hi);
    __m512i l = half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, lo) : _mm512_loadu_si512((const void *)lo);
    __m512i t = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, h), 8);
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(t, u, l)), lanes[m], acc[m]);
  }
}

/* Two groups' 16 nibble bytes (b NULL: one group) → their 64 codes in value order: 128-bit lanes a a b b,
 * the second of each pair shifted right by 4, masked. */
static inline __m512i nibbles_64(const uint8_t *a, const uint8_t *b) {
  __m128i va = _mm_loadu_si128((const __m128i *)a), vb = b ? _mm_loadu_si128((const __m128i *)b) : _mm_setzero_si128();
  __m512i v = _mm512_castsi256_si512(_mm256_inserti128_si256(_mm256_castsi128_si256(va), vb, 1));
  v = _mm512_shuffle_i64x2(v, v, 0x50);
  return _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)), _mm512_set1_epi8(15));
}

/* Lanes 0-7 group 2p, 8-15 group 2p + 1: the permute that gives pair p's lanes their groups' scales. */
static inline __m512i pair_index(int p) {
  return _mm512_add_epi32(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), _mm512_set1_epi32(2 * p));
}

/* One pair of 32-value blocks at `a` (`both` = 0: the row's last, odd block alone) into acc. */
static inline __attribute__((always_inline)) void pair_32(int fmt, const uint8_t *a, int both, const act_t *x,
                                                          int64_t g, int M, const __m512 *s, __m512i pi, __m512 *acc) {
  const int64_t bb = block_bytes(fmt), qs = bb - 16; /* the 16 nibble bytes end each block */
  const uint8_t *b = both ? a + bb : NULL;
  __m512i u = nibbles_64(a + qs, both ? b + qs : NULL);
  if (fmt == F_Q5_0) { /* the fifth bits: 32 per block, bit j for value j */
    uint32_t ba, bh = 0;
    memcpy(&ba, a + 2, 4);
    if (both) memcpy(&bh, b + 2, 4);
    u = _mm512_mask_add_epi8(u, _cvtu64_mask64((uint64_t)ba | (uint64_t)bh << 32), u, _mm512_set1_epi8(16));
  }
  __m512 lanes[MAX_ROWS];
  for (int m = 0; m < M; m++) lanes[m] = _mm512_permutexvar_ps(pi, s[m]);
  bytes_fma(u, x, g, M, lanes, acc, !both);
}

/* Q4_0, Q4_1, Q5_0 (32 values a block, f16 d first): 16 groups at a time, their scales gathered. */
static inline __attribute__((always_inline)) void row_bytes_32(int fmt, const uint8_t *row, const act_t *x,
                                                               const int M, float *out) {
  const int64_t bb = block_bytes(fmt);
  const float offset = fmt == F_Q4_0 ? 8.0f : fmt == F_Q5_0 ? 16.0f : 0.0f;
  const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32((int)bb));
  const int64_t G = x->G;
  __m512 acc[MAX_ROWS], corr[MAX_ROWS], s[MAX_ROWS];
  for (int m = 0; m < M; m++) acc[m] = corr[m] = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < G; g0 += 16, row += 16 * bb) {
    const int n = G - g0 < 16 ? (int)(G - g0) : 16;
    const __mmask16 k = (__mmask16)((1u << n) - 1);
    __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, at, row, 1)));
    __m512 mn = fmt == F_Q4_1 ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(
                                    _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, at, row + 2, 1)))
                              : _mm512_mul_ps(dw, _mm512_set1_ps(-offset)); /* value = code · d + mn */
    for (int m = 0; m < M; m++) {
      s[m] = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(k, x->d + m * G + g0));
      corr[m] = _mm512_fmadd_ps(mn, _mm512_maskz_loadu_ps(k, x->sum + m * G + g0), corr[m]);
    }
    int p = 0;
    __m512i pi = pair_index(0); /* stepped by 2 a pair: no broadcast from a register in the loop */
    for (; 2 * p + 1 < n; p++, pi = _mm512_add_epi32(pi, _mm512_set1_epi32(2)))
      pair_32(fmt, row + 2 * p * bb, 1, x, g0 + 2 * p, M, s, pi, acc);
    if (n % 2) pair_32(fmt, row + 2 * p * bb, 0, x, g0 + 2 * p, M, s, pi, acc);
  }
  for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(acc[m]) + _mm512_reduce_add_ps(corr[m]);
}

/* Q4_K: super-block chunk c (32 bytes) is groups 2c (low nibbles) and 2c + 1 (high): one pair. */
static inline __attribute__((always_inline)) void row_bytes_q4_k(const uint8_t *row, const act_t *x, const int M,
                                                                 float *out) {
  const int64_t G = x->G;
  __m512 acc[MAX_ROWS], s[MAX_ROWS];
  __m256 mins[MAX_ROWS];
  for (int m = 0; m < M; m++) {
    acc[m] = _mm512_setzero_ps();
    mins[m] = _mm256_setzero_ps();
  }
  for (int64_t g = 0; g < G; g += 8, row += 144) {
    float scale[8];
    __m256 mn;
    q4_k_scales_mins(row, scale, &mn);
    __m256 sc = _mm256_loadu_ps(scale);
    for (int m = 0; m < M; m++) {
      s[m] = _mm512_castps256_ps512(_mm256_mul_ps(sc, _mm256_loadu_ps(x->d + m * G + g)));
      mins[m] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(x->sum + m * G + g), mins[m]);
    }
    for (int c = 0; c < 4; c++) {
      __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(row + 16 + 32 * c)));
      __m512i u = _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4)), _mm512_set1_epi8(15));
      __m512 lanes[MAX_ROWS];
      for (int m = 0; m < M; m++) lanes[m] = _mm512_permutexvar_ps(pair_index(c), s[m]);
      bytes_fma(u, x, g + 2 * c, M, lanes, acc, 0);
    }
  }
  for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(acc[m]) - hsum(mins[m]);
}

/* Q6_K: pair p (0..3) of a super-block is runs 2(p % 2), 2(p % 2) + 1 of half p / 2 (see unpack_q6_k): the
 * low (p even) or high nibbles of the half's 64 ql bytes, and bits 0-1 / 2-3 (or 4-5 / 6-7) of its 32 qh bytes.
 * Each 16 values have their own scale: lane i of pair p is sub-block 4p + i/4. */
static inline __attribute__((always_inline)) void row_bytes_q6_k(const uint8_t *row, const act_t *x, const int M,
                                                                 float *out) {
  const int64_t G = x->G;
  __m512 acc[MAX_ROWS], corr[MAX_ROWS], s[MAX_ROWS];
  for (int m = 0; m < M; m++) acc[m] = corr[m] = _mm512_setzero_ps();
  const __m512i sub_group = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7); /* sub-block → group */
  for (int64_t g = 0; g < G; g += 8, row += 210) {
    __m512 sc = _mm512_mul_ps(_mm512_set1_ps(f16(row + 208)),
                              _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + 192)))));
    for (int m = 0; m < M; m++) {
      __m512 xd = _mm512_permutexvar_ps(sub_group, _mm512_castps256_ps512(_mm256_loadu_ps(x->d + m * G + g)));
      s[m] = _mm512_mul_ps(sc, xd);
      corr[m] = _mm512_fmadd_ps(sc, _mm512_loadu_ps(x->sum16 + m * 2 * G + 2 * g), corr[m]);
    }
    for (int p = 0; p < 4; p++) {
      const int h = p / 2, r = 2 * (p % 2);
      __m512i l = _mm512_loadu_si512((const void *)(row + 64 * h));
      if (r) l = _mm512_srli_epi16(l, 4);
      __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(row + 128 + 32 * h)));
      qh = _mm512_srlv_epi16(qh, _mm512_inserti64x4(_mm512_set1_epi16((short)(2 * r)), _mm256_set1_epi16((short)(2 * r + 2)), 1));
      __m512i u = _mm512_or_si512(_mm512_and_si512(l, _mm512_set1_epi8(15)),
                                  _mm512_slli_epi16(_mm512_and_si512(qh, _mm512_set1_epi8(3)), 4));
      __m512i i = _mm512_add_epi32(_mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2),
                                   _mm512_set1_epi32(4 * p));
      __m512 lanes[MAX_ROWS];
      for (int m = 0; m < M; m++) lanes[m] = _mm512_permutexvar_ps(i, s[m]);
      bytes_fma(u, x, g + 2 * p, M, lanes, acc, 0);
    }
  }
  for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(acc[m]) - 32.0f * _mm512_reduce_add_ps(corr[m]);
}
#endif

/* out[m] = row · x_m for one row of W in format fmt, M rows of x. `M` is a constant at each call site
 * (see row_dots), so the loops over rows unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void row_dots_m(int fmt, const uint8_t *row, const act_t *x,
                                                             const int M, float *out) {
#if BYTE_PRODUCTS
  switch (fmt) {
    case F_Q4_0: row_bytes_32(F_Q4_0, row, x, M, out); return; /* fmt a constant in each copy */
    case F_Q4_1: row_bytes_32(F_Q4_1, row, x, M, out); return;
    case F_Q5_0: row_bytes_32(F_Q5_0, row, x, M, out); return;
    case F_Q4_K: row_bytes_q4_k(row, x, M, out); return;
    case F_Q6_K: row_bytes_q6_k(row, x, M, out); return;
  }
#endif
  acc_t acc[MAX_ROWS], acc2[MAX_ROWS];
  float minus[MAX_ROWS]; /* the formats with a min: Σ_group min · (sum of x over the group) */
  for (int m = 0; m < M; m++) {
    acc[m] = acc2[m] = acc_zero();
    minus[m] = 0.0f;
  }
  const int64_t G = x->G;
  int64_t g = 0;
  switch (fmt) {
    case F_Q8_0: /* alternate two accumulators: with one row of x, the FMA's latency, not its throughput,
                    would bound a single chain. For every row count alike, so that a row's result does not
                    depend on the batch it came in (a batched server's output equals the request alone). */
      for (; g + 1 < G; g += 2, row += 68) {
          group_fma(widen_w(unpack_q8_0(row)), f16(row), x, g, M, acc);
          group_fma(widen_w(unpack_q8_0(row + 34)), f16(row + 34), x, g + 1, M, acc2);
        }
      for (; g < G; g++, row += 34) group_fma(widen_w(unpack_q8_0(row)), f16(row), x, g, M, acc);
      break;
    case F_Q4_0:
      for (; g < G; g++, row += 18) group_fma(widen_w(unpack_q4_0(row + 2, 8)), f16(row), x, g, M, acc);
      break;
    case F_Q4_1:
      for (; g < G; g++, row += 20) {
        group_fma(widen_w(unpack_q4_0(row + 4, 0)), f16(row), x, g, M, acc);
        float mn = f16(row + 2);
        for (int m = 0; m < M; m++) minus[m] -= mn * x->sum[m * G + g]; /* value = code · d + m */
      }
      break;
    case F_Q5_0:
      for (; g + 1 < G; g += 2, row += 44) {
          group_fma(widen_w(unpack_q5_0(row)), f16(row), x, g, M, acc);
          group_fma(widen_w(unpack_q5_0(row + 22)), f16(row + 22), x, g + 1, M, acc2);
        }
      for (; g < G; g++, row += 22) group_fma(widen_w(unpack_q5_0(row)), f16(row), x, g, M, acc);
      break;
    case F_Q4_K: { /* the min term dmin · Σ_j mn_j · (x summed over sub-block j) as 8 lanes, one FMA a block */
      __m256 mins[MAX_ROWS];
      for (int m = 0; m < M; m++) mins[m] = _mm256_setzero_ps();
      for (; g < G; g += 8, row += 144) {
        float scale[8];
        __m256 mn;
        q4_k_scales_mins(row, scale, &mn);
        for (int j = 0; j < 8; j++) group_fma(widen_w(unpack_q4_k(row, j)), scale[j], x, g + j, M, acc);
        for (int m = 0; m < M; m++) mins[m] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(x->sum + m * G + g), mins[m]);
      }
      for (int m = 0; m < M; m++) minus[m] = hsum(mins[m]);
      break;
    }
    case F_Q6_K:
      for (; g < G; g += 8, row += 210) {
        float d = f16(row + 208);
        for (int j = 0; j < 8; j++) {
          const int8_t *sc = (const int8_t *)(row + 192) + 2 * j; /* values 0-15 × sc[0], 16-31 × sc[1] */
          group_fma_lanes(widen_w(unpack_q6_k(row, j)), halves((float)sc[0], (float)sc[1]), d, x, g + j, M, acc);
        }
      }
      break;
  }
  for (int m = 0; m < M; m++) out[m] = acc_sum(acc[m], acc2[m]) - minus[m];
}

/* Each row of W is prefetched PREFETCH bytes ahead of the row being read. The hardware prefetcher
 * stops at every 4 KiB page and ramps up again after it; the layers' matrices are small (112-900 KiB for the
 * 270M, split between threads), so a decode step spends much of its time in those ramps without this. */
#ifndef PREFETCH
#define PREFETCH 4096
#endif
static inline void prefetch_row(const uint8_t *row, int64_t row_bytes, const uint8_t *end) {
  const uint8_t *p = row + PREFETCH;
  for (int64_t i = 0; i < row_bytes && p + i < end; i += 64) _mm_prefetch((const char *)(p + i), _MM_HINT_T0);
}

static void row_dots(int fmt, const uint8_t *row, const act_t *x, int M, float *out) {
  switch (M) { /* one specialised copy per row count */
    case 1: row_dots_m(fmt, row, x, 1, out); break;
    case 2: row_dots_m(fmt, row, x, 2, out); break;
    case 3: row_dots_m(fmt, row, x, 3, out); break;
    case 4: row_dots_m(fmt, row, x, 4, out); break;
    case 5: row_dots_m(fmt, row, x, 5, out); break;
    case 6: row_dots_m(fmt, row, x, 6, out); break;
    case 7: row_dots_m(fmt, row, x, 7, out); break;
    default: row_dots_m(fmt, row, x, 8, out); break;
  }
}

#if BYTE_PRODUCTS
/* One row of x (a decode step): the row loop with the format's product inlined, its constants set up once a
 * call rather than once a row. The same function per row, so the same bits as row_dots. Q8_0 (the head) stays
 * on row_dots: a per-call dispatch that included it made the head slower (the figures: docs/performance.md,
 * "Figures the source comments used to quote"). */
#ifndef SPAN
#define SPAN 1
#endif
#define ROW_SPAN(name, call)                                                                                     \
  static void name(const uint8_t *w, int64_t row_bytes, int64_t lo, int64_t hi, const act_t *x, float *y) {    \
    for (int64_t n = lo; n < hi; n++) {                                                                         \
      const uint8_t *row = w + n * row_bytes;                                                                   \
      if (PREFETCH) prefetch_row(row, row_bytes, w + hi * row_bytes);                                           \
      call;                                                                                                     \
    }                                                                                                           \
  }
ROW_SPAN(span_q5_0, row_bytes_32(F_Q5_0, row, x, 1, y + n))
ROW_SPAN(span_q4_k, row_bytes_q4_k(row, x, 1, y + n))
ROW_SPAN(span_q6_k, row_bytes_q6_k(row, x, 1, y + n))
#endif

/* y[n] for n in [lo, hi) through a span, for one row of x: 1 when fmt has one, else 0 (nothing written). */
static int row_span(int fmt, const uint8_t *w, int64_t row_bytes, int64_t lo, int64_t hi, const act_t *x, float *y) {
#if BYTE_PRODUCTS
  if (SPAN) switch (fmt) {
    case F_Q5_0: span_q5_0(w, row_bytes, lo, hi, x, y); return 1;
    case F_Q4_K: span_q4_k(w, row_bytes, lo, hi, x, y); return 1;
    case F_Q6_K: span_q6_k(w, row_bytes, lo, hi, x, y); return 1;
  }
#endif
  (void)fmt; (void)w; (void)row_bytes; (void)lo; (void)hi; (void)x; (void)y;
  return 0;
}

/* y (M, N) fp32 = x (M, K) fp32 · Wᵀ, W (N, K) in `fmt`, rows `row_bytes` apart. Returns 0, or -1 for a bad
 * format, shape or row count (nothing written), -2 when out of memory. */
int gemma3_q_linear(int fmt, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const float *x,
                    int64_t M, float *y) {
  int64_t qk = gemma3_q_block_values(fmt);
  if (qk == 0 || K <= 0 || K % qk || N < 0 || M < 1 || M > MAX_ROWS || row_bytes < K / qk * gemma3_q_block_bytes(fmt))
    return -1;
  void *mem = malloc(act_bytes(M, K));
  if (!mem) return -2;
  const act_t *act = act_build(x, M, K, mem);
#pragma omp parallel if (N * K >= (1 << 15))
  {
    int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t lo = N * t / T, hi = N * (t + 1) / T;
    float out[MAX_ROWS];
    if (M == 1 && row_span(fmt, w, row_bytes, lo, hi, act, y)) lo = hi;
    for (int64_t n = lo; n < hi; n++) {
      if (PREFETCH) prefetch_row(w + n * row_bytes, row_bytes, w + hi * row_bytes);
      row_dots(fmt, w + n * row_bytes, act, (int)M, out);
      for (int64_t m = 0; m < M; m++) y[m * N + n] = out[m];
    }
  }
  free(mem);
  return 0;
}

/* ------------------------------------------------------------------------------------------ shared with step.c */
/* The fused decode step (step.c) rounds an activation once and multiplies several matrices by it, each
 * thread taking a range of output rows: the same row_dots as gemma3_q_linear, so the same bits per output.
 * The prepared activation lives in caller-provided scratch of gemma3_q_act_bytes(M, K) bytes. */
size_t gemma3_q_act_bytes(int64_t M, int64_t K) { return act_bytes(M, K); }

void gemma3_q_act_prepare(const float *x, int64_t M, int64_t K, void *scratch) { act_build(x, M, K, scratch); }


/* y[m · ldy + n] = row n of W · x_m for n in [lo, hi); M = the prepared activation's rows (<= MAX_ROWS). */
void gemma3_q_rows(int fmt, const uint8_t *w, int64_t row_bytes, int64_t lo, int64_t hi, const void *act, int M,
                   float *y, int64_t ldy) {
  if (M == 1 && row_span(fmt, w, row_bytes, lo, hi, act, y)) return;
  float out[MAX_ROWS];
  for (int64_t n = lo; n < hi; n++) {
    if (PREFETCH) prefetch_row(w + n * row_bytes, row_bytes, w + hi * row_bytes);
    row_dots(fmt, w + n * row_bytes, act, M, out);
    for (int m = 0; m < M; m++) y[m * ldy + n] = out[m];
  }
}

/* For tests and the torch fallback: x's rounding, as gemma3_q_linear does it (codes · scale, in fp32). */
int gemma3_q_round_activation(const float *x, int64_t M, int64_t K, float *out) {
  if (K <= 0 || K % QK || M < 0) return -1;
  int64_t G = K / QK;
  int16_t *q = malloc((size_t)K * sizeof(int16_t));
  float *d = malloc((size_t)G * sizeof(float)), *s = malloc((size_t)G * sizeof(float));
  if (!q || !d || !s) {
    free(q); free(d); free(s);
    return -2;
  }
  for (int64_t m = 0; m < M; m++) {
    quantize_row(x + m * K, K, q, d, s);
    for (int64_t i = 0; i < K; i++) out[m * K + i] = (float)q[i] * d[i / QK];
  }
  free(q); free(d); free(s);
  return 0;
}

/* ------------------------------------------------------------------------------------------ dequantization */
static inline w16_t widen_32(__m256i v) { /* in value order: a = values 0-15, b = 16-31 */
  w16_t w = {_mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1))};
  return w;
}

static inline void store_group(float *out, w16_t w, float scale, float minus) {
  __m256 s = _mm256_set1_ps(scale), mn = _mm256_set1_ps(minus);
  __m256i parts[4] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(w.a)), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(w.a, 1)),
                      _mm256_cvtepi16_epi32(_mm256_castsi256_si128(w.b)), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(w.b, 1))};
  for (int i = 0; i < 4; i++)
    _mm256_storeu_ps(out + 8 * i, _mm256_fmsub_ps(_mm256_cvtepi32_ps(parts[i]), s, mn));
}

static void dequantize_row(int fmt, const uint8_t *row, int64_t K, float *out) {
  int64_t G = K / QK;
  switch (fmt) {
    case F_Q8_0:
      for (int64_t g = 0; g < G; g++, row += 34) store_group(out + g * QK, widen_32(unpack_q8_0(row)), f16(row), 0.0f);
      break;
    case F_Q4_0:
      for (int64_t g = 0; g < G; g++, row += 18)
        store_group(out + g * QK, widen_32(unpack_q4_0(row + 2, 8)), f16(row), 0.0f);
      break;
    case F_Q4_1:
      for (int64_t g = 0; g < G; g++, row += 20)
        store_group(out + g * QK, widen_32(unpack_q4_0(row + 4, 0)), f16(row), -f16(row + 2));
      break;
    case F_Q5_0:
      for (int64_t g = 0; g < G; g++, row += 22) store_group(out + g * QK, widen_32(unpack_q5_0(row)), f16(row), 0.0f);
      break;
    case F_Q4_K:
      for (int64_t g = 0; g < G; g += 8, row += 144) {
        float scale[8], minus[8];
        __m256 mins;
        q4_k_scales_mins(row, scale, &mins);
        _mm256_storeu_ps(minus, mins);
        for (int j = 0; j < 8; j++) store_group(out + (g + j) * QK, widen_32(unpack_q4_k(row, j)), scale[j], minus[j]);
      }
      break;
    case F_Q6_K:
      for (int64_t g = 0; g < G; g += 8, row += 210) {
        float d = f16(row + 208);
        for (int j = 0; j < 8; j++) {
          w16_t w = widen_32(unpack_q6_k(row, j));
          __m256i sc = q6_k_scales(row, j);
          w.a = _mm256_mullo_epi16(w.a, _mm256_permute2x128_si256(sc, sc, 0x00)); /* values 0-15: first scale */
          w.b = _mm256_mullo_epi16(w.b, _mm256_permute2x128_si256(sc, sc, 0x11)); /* 16-31: second */
          store_group(out + (g + j) * QK, w, d, 0.0f);
        }
      }
      break;
  }
}

/* out (R, K) fp32 = rows of W: all N of them when ids is NULL (R = N), else the R rows ids names (an
 * embedding lookup; each id in [0, N), checked by the caller). Returns 0 or -1 for a bad format or shape. */
int gemma3_q_dequantize(int fmt, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const int64_t *ids,
                        int64_t R, float *out) {
  int64_t qk = gemma3_q_block_values(fmt);
  if (qk == 0 || K <= 0 || K % qk || R < 0 || (ids == NULL && R != N) ||
      row_bytes < K / qk * gemma3_q_block_bytes(fmt))
    return -1;
#pragma omp parallel for schedule(static) if (R * K >= (1 << 16))
  for (int64_t r = 0; r < R; r++) dequantize_row(fmt, w + (ids ? ids[r] : r) * row_bytes, K, out + r * K);
  return 0;
}
