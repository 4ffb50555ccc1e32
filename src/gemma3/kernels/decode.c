/* The small fp32 operations of a decode step, fused: RMSNorm and one token's attention over the KV cache.
 *
 * Why: a 270M decode step runs 109 norms and 18 attentions on tiny tensors (640 or 4 × 256 values, one
 * query per head). In eager torch each is several dispatched ops whose fixed cost dwarfs the arithmetic:
 * together more than the layers' weight reads of a quantized step (docs/performance.md, "Figures the
 * kernels' comments used to quote"). Here each is one call. gemma3/accel/native.py swaps them in.
 *
 * Numerics: fp32 throughout, as torch's kernels, summing in a different order (results agree to a few ulp).
 * Attention: exact two-pass softmax (max, then exp and sum), masked keys skipped; a query that may see no key
 * gets NaN, as SDPA gives.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include <omp.h>

static inline float hsum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float dot(const float *a, const float *b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  float s = hsum8(_mm256_add_ps(s0, s1));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

/* A cached key or value row holds fp32 or, `half`, fp16 values (a KVCache of torch.float16: half the memory
 * and half the bytes a step reads, what llama.cpp keeps by default). fp16 widens to fp32 exactly (F16C), so the
 * arithmetic is the same fp32 either way: what differs is that the cache held each value rounded to fp16. */
static inline __attribute__((always_inline)) __m256 load8(const void *row, int64_t i, int half) {
  return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)))
              : _mm256_loadu_ps((const float *)row + i);
}

static inline __attribute__((always_inline)) float load1(const void *row, int64_t i, int half) {
  return half ? _cvtsh_ss(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* row `s` of a (rows, hd) cache block */
static inline __attribute__((always_inline)) const void *row_at(const void *base, int64_t s, int64_t hd, int half) {
  return (const char *)base + s * hd * (half ? 2 : 4);
}

/* dst (n values, fp32 or `half`) = x: the cache write; fp16 rounds to nearest even, as torch's conversion. */
void gemma3_store_kv(const float *x, int64_t n, void *dst, int64_t half) {
  if (!half) {
    memcpy(dst, x, (size_t)n * sizeof(float));
    return;
  }
  uint16_t *h = dst;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; i++) h[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}

/* dot(q_g, k) for gn <= 4 query heads (rows of q, n apart) against one key, the key read once: the same sums
 * in the same order as dot() for each head (so the same bits), but 2·gn independent chains, not 2 (one dot
 * alone waits on its FMAs' latency, 2 048 times a layer). */
static inline __attribute__((always_inline)) void dots(const float *q, int64_t gn, const void *k, int half, int64_t n,
                                                       float *out) {
  __m256 a[4][2];
  for (int g = 0; g < gn; g++) a[g][0] = a[g][1] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 k0 = load8(k, i, half), k1 = load8(k, i + 8, half);
    for (int g = 0; g < gn; g++) {
      a[g][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * n + i), k0, a[g][0]);
      a[g][1] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * n + i + 8), k1, a[g][1]);
    }
  }
  for (int g = 0; g < gn; g++) {
    float s = hsum8(_mm256_add_ps(a[g][0], a[g][1]));
    for (int64_t j = i; j < n; j++) s += q[g * n + j] * load1(k, j, half);
    out[g] = s;
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) /* the fp16 tail's masked 16-bit load */
#define ATTN_AVX512 1
#else
#define ATTN_AVX512 0
#endif

#if ATTN_AVX512
/* The AVX-512 build's attention loops: 16 values a register, and a row's tail as a masked load (zeros past
 * the end) instead of a scalar loop. */
static inline __attribute__((always_inline)) __m512 load16(const void *row, int64_t i, int64_t n, int half) {
  const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
  return half ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, (const uint16_t *)row + i))
              : _mm512_maskz_loadu_ps(k, (const float *)row + i);
}

/* The four registers' sums, in one vector: halves, then quarters added across the registers (six shuffles
 * for four sums, where four separate reductions take twelve). */
static inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
  x = _mm512_add_ps(x, _mm512_permute_ps(x, _MM_SHUFFLE(1, 0, 3, 2))); /* 128-bit lane j: register j's 4 partials */
  x = _mm512_add_ps(x, _mm512_permute_ps(x, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), x));
}

/* dots() with 16-value registers: gn <= 4 query heads (rows of q, n apart) against one key, read once. */
static inline __attribute__((always_inline)) void dots16(const float *q, int64_t gn, const void *k, int half, int64_t n,
                                                         float *out) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    __m512 kv = load16(k, i, n, half);
    for (int g = 0; g < 4; g++)
      if (g < gn) a[g] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + g * n + i), kv, a[g]);
  }
  float t[4];
  _mm_storeu_ps(t, sum4(a[0], a[1], a[2], a[3]));
  for (int g = 0; g < gn; g++) out[g] = t[g];
}
#endif

/* exp(x) for x <= 0 (softmax arguments after subtracting the max), 8 at a time: x = n·ln2 + r with
 * |r| <= ln2/2 (ln2 split in two parts for an exact reduction), exp(r) by its degree-6 Taylor polynomial
 * (relative error < 2e-7, about glibc's expf), times 2^n built in the exponent bits; below -87.3, 0.
 * glibc's scalar expf is one call per value, 2 048 calls a layer for the 270M. */
static inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* out = gelu_tanh(g) · u over n values (GeGLU's middle), 8 at a time: gelu_tanh(x) = 0.5·x·(1 + tanh(z)), z =
 * sqrt(2/π)·(x + 0.044715·x³), and 1 + tanh(z) = 2 / (1 + exp(-2z)), written with exp of a non-positive
 * argument on either side of 0 (no overflow, no cancellation): e = exp(-2|z|), 1 + tanh(z) = 2/(1 + e) for
 * z >= 0 and 2e/(1 + e) below. Within 2 ulp of torch's F.gelu(approximate="tanh"), which computes
 * 1 + tanh(z) with its own vectorised tanh. */
void gemma3_gelu_tanh_mul(const float *g, const float *u, int64_t n, float *out) {
  const float beta = (float)(1.41421356237309504880 * 1.12837916709551257390 * 0.5), kappa = 0.044715f;
  const __m256 vb = _mm256_set1_ps(beta), vk = _mm256_set1_ps(kappa), half = _mm256_set1_ps(0.5f),
               one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_loadu_ps(g + i);
    __m256 z = _mm256_mul_ps(vb, _mm256_add_ps(x, _mm256_mul_ps(vk, _mm256_mul_ps(_mm256_mul_ps(x, x), x))));
    __m256 e = exp_nonpositive(_mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_andnot_ps(sign, z)));
    __m256 num = _mm256_blendv_ps(two, _mm256_mul_ps(two, e), z); /* z's sign bit picks 2e */
    __m256 t = _mm256_div_ps(num, _mm256_add_ps(one, e));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(half, x), t);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(y, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; i++) {
    float x = g[i], z = beta * (x + kappa * (x * x * x));
    float e = expf(-2.0f * fabsf(z)), t = (z >= 0 ? 2.0f : 2.0f * e) / (1.0f + e);
    out[i] = 0.5f * x * t * u[i];
  }
}

/* out = x / sqrt(mean(x²) + eps) · gain, per row of `dim` values; gain is (1 + w) in fp32. */
void gemma3_rms_norm(const float *x, const float *gain, int64_t rows, int64_t dim, float eps, float *out) {
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * dim;
    float *o = out + r * dim;
    float inv = 1.0f / sqrtf(dot(xr, xr, dim) / (float)dim + eps);
    __m256 vi = _mm256_set1_ps(inv);
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8)
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), vi), _mm256_loadu_ps(gain + i)));
    for (; i < dim; i++) o[i] = xr[i] * inv * gain[i];
  }
}

/* One query token per row. q (B, KH, G, hd) contiguous: the G query heads that share KV head kh; keys and
 * values of row b, head kh start at k + b·kb + kh·kh_stride, one key of hd values per `hd` floats, S of
 * them; mask (B, S) bytes (1 = may attend) or NULL; out (B, KH, G, hd). `scores` is scratch of
 * B·KH·G·S floats. Each key and value is read once for all G query heads that share it (they are the
 * bytes that count: 2 × 512 × 256 fp32 = 1 MiB a layer for the 270M at a full window). */
/* Attention of one token's G query heads (those sharing one KV head) over S cached keys, split into parts of
 * KEY_PART keys (flash-decoding's split-K). Each part keeps its own max, sum of exponentials and unnormalised
 * weighted sum of values; `attend_combine` rescales the parts to the largest max and adds them in part order.
 * The parts are fixed by the key count alone, not by the threads that compute them, so 1 and 2 threads give
 * the same bits; and they let two threads share the keys of the 270M's one KV head, each reading half of the
 * cache once (a part's keys and values are read once for all G heads).
 *
 * Keys past the row's last visible one are left out, not summed as zeros, so a row's result depends only on its
 * own keys (a batched server's row equals the same request run alone). A head that may see no key gets NaN,
 * as SDPA gives. */
#define KEY_PART 256

static int64_t visible_end(const uint8_t *m, int64_t S) {
  if (m) while (S > 0 && !m[S - 1]) S--;
  return S;
}

int64_t gemma3_attend_key_part(void) { return KEY_PART; }

/* Prefetch the row ATTN_PREFETCH keys after `row` (`bytes` long), not past `end`: a layer's keys and values were
 * written over the last few hundred steps and are read back from memory, a 1 KiB row per key (hd 256, fp32),
 * where the hardware prefetcher restarts at every 4 KiB page. */
#ifndef ATTN_PREFETCH
#define ATTN_PREFETCH 8
#endif
static inline __attribute__((always_inline)) void prefetch_ahead(const void *row, int64_t bytes, const void *end) {
  const char *p = (const char *)row + ATTN_PREFETCH * bytes;
  for (int64_t c = 0; c < bytes && p + c < (const char *)end; c += 64) _mm_prefetch(p + c, _MM_HINT_T0);
}

int64_t gemma3_attend_parts(const uint8_t *m, int64_t S) {
  int64_t n = (visible_end(m, S) + KEY_PART - 1) / KEY_PART;
  return n > 0 ? n : 1;
}

/* Part `part` of the keys: o (G, hd) = Σ exp(score - mx_g) · v, l_g = Σ exp(score - mx_g), mx_g the part's
 * largest score (-inf and zeros when the part has no visible key). sc: scratch of G · KEY_PART floats. Keys and
 * values fp32 or, `half`, fp16 (load8): built once for each, the flag a constant inside. */
static inline __attribute__((always_inline)) void attend_part(const float *q, const void *kk, const void *vv,
                                                              const uint8_t *m, int64_t S, int64_t G, int64_t hd,
                                                              float scale, int64_t part, float *sc, float *o,
                                                              float *mx, float *l, const int half) {
  int64_t end = visible_end(m, S), s0 = part * KEY_PART, s1 = s0 + KEY_PART < end ? s0 + KEY_PART : end;
  int64_t n = s1 > s0 ? s1 - s0 : 0;
  const int64_t row_bytes = hd * (half ? 2 : 4);
  for (int64_t i = 0; i < n; i++) {
    int64_t s = s0 + i;
    const void *ks = row_at(kk, s, hd, half);
    prefetch_ahead(ks, row_bytes, row_at(kk, s1, hd, half)); /* the cache is read once, from memory */
    if (m && !m[s]) {
      for (int64_t g = 0; g < G; g++) sc[g * KEY_PART + i] = -INFINITY;
      continue;
    }
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
      float d[4];
#if ATTN_AVX512
      if (G - g0 >= 4) dots16(q + g0 * hd, 4, ks, half, hd, d);
      else dots16(q + g0 * hd, G - g0, ks, half, hd, d);
#else
      if (G - g0 >= 4) dots(q + g0 * hd, 4, ks, half, hd, d);
      else dots(q + g0 * hd, G - g0, ks, half, hd, d);
#endif
      for (int64_t g = g0; g < G && g < g0 + 4; g++) sc[g * KEY_PART + i] = d[g - g0] * scale;
    }
  }
  for (int64_t g = 0; g < G; g++) {
    float top = -INFINITY, *sg = sc + g * KEY_PART;
    for (int64_t i = 0; i < n; i++)
      if (sg[i] > top) top = sg[i];
    mx[g] = top;
    if (top == -INFINITY) { /* nothing visible in this part */
      for (int64_t i = 0; i < n; i++) sg[i] = 0.0f;
      l[g] = 0.0f;
      continue;
    }
    __m256 vmx = _mm256_set1_ps(top), vt = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) { /* exp(-inf) is 0: masked keys weigh nothing */
      __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sg + i), vmx));
      _mm256_storeu_ps(sg + i, e);
      vt = _mm256_add_ps(vt, e);
    }
    float total = hsum8(vt);
    for (; i < n; i++) total += (sg[i] = sg[i] == -INFINITY ? 0.0f : expf(sg[i] - top));
    l[g] = total;
  }
  /* o_g = Σ_s e_gs · v_s, in key order for every value */
#if ATTN_AVX512
  /* 64 values of up to 4 heads at a time in 16 registers, over all keys: each register is stored once, not
     loaded, added to and stored again for every key. The first block reads the value rows from memory; the
     others find them in L2 (a part's values are 128-256 KiB). */
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const int64_t gn = G - g0 < 4 ? G - g0 : 4;
    for (int64_t c0 = 0; c0 < hd; c0 += 64) {
      __m512 acc[4][4];
      for (int g = 0; g < 4; g++)
        for (int j = 0; j < 4; j++) acc[g][j] = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; i++) {
        int64_t s = s0 + i;
        if (m && !m[s]) continue;
        const void *vs = row_at(vv, s, hd, half);
        if (c0 == 0) prefetch_ahead(vs, row_bytes, row_at(vv, s1, hd, half));
        __m512 v[4];
        for (int j = 0; j < 4; j++) v[j] = c0 + 16 * j < hd ? load16(vs, c0 + 16 * j, hd, half) : _mm512_setzero_ps();
        for (int g = 0; g < 4; g++) {
          if (g >= gn) continue;
          __m512 p = _mm512_set1_ps(sc[(g0 + g) * KEY_PART + i]);
          for (int j = 0; j < 4; j++) acc[g][j] = _mm512_fmadd_ps(p, v[j], acc[g][j]);
        }
      }
      for (int g = 0; g < gn; g++)
        for (int j = 0; j < 4 && c0 + 16 * j < hd; j++) {
          int64_t left = hd - c0 - 16 * j;
          _mm512_mask_storeu_ps(o + (g0 + g) * hd + c0 + 16 * j, left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1),
                                acc[g][j]);
        }
    }
  }
#else
  for (int64_t x = 0; x < G * hd; x++) o[x] = 0.0f;
  for (int64_t i = 0; i < n; i++) {
    int64_t s = s0 + i;
    if (m && !m[s]) continue;
    const void *vs = row_at(vv, s, hd, half);
    prefetch_ahead(vs, row_bytes, row_at(vv, s1, hd, half));
    for (int64_t g = 0; g < G; g++) {
      __m256 p = _mm256_set1_ps(sc[g * KEY_PART + i]);
      float *og = o + g * hd;
      int64_t c = 0;
      for (; c + 8 <= hd; c += 8) _mm256_storeu_ps(og + c, _mm256_fmadd_ps(p, load8(vs, c, half), _mm256_loadu_ps(og + c)));
      for (; c < hd; c++) og[c] += sc[g * KEY_PART + i] * load1(vs, c, half);
    }
  }
#endif
}

void gemma3_attend_part(const float *q, const void *kk, const void *vv, int64_t half, const uint8_t *m, int64_t S,
                        int64_t G, int64_t hd, float scale, int64_t part, float *sc, float *o, float *mx, float *l) {
  if (half) attend_part(q, kk, vv, m, S, G, hd, scale, part, sc, o, mx, l, 1);
  else attend_part(q, kk, vv, m, S, G, hd, scale, part, sc, o, mx, l, 0);
}

/* out (G, hd) from `parts` parts' (o, mx, l), each part's o G·hd floats and mx, l G floats apart. */
void gemma3_attend_combine(int64_t G, int64_t hd, int64_t parts, const float *o, const float *mx, const float *l,
                           float *out) {
  for (int64_t g = 0; g < G; g++) {
    float top = -INFINITY;
    for (int64_t p = 0; p < parts; p++)
      if (mx[p * G + g] > top) top = mx[p * G + g];
    float *og = out + g * hd;
    if (top == -INFINITY) { /* no visible key at all */
      for (int64_t c = 0; c < hd; c++) og[c] = NAN;
      continue;
    }
    float total = 0.0f;
    for (int64_t c = 0; c < hd; c++) og[c] = 0.0f;
    for (int64_t p = 0; p < parts; p++) {
      if (mx[p * G + g] == -INFINITY) continue;
      float w = expf(mx[p * G + g] - top);
      total += w * l[p * G + g];
      const float *op = o + (p * G + g) * hd;
      for (int64_t c = 0; c < hd; c++) og[c] += w * op[c];
    }
    float inv = 1.0f / total;
    for (int64_t c = 0; c < hd; c++) og[c] *= inv;
  }
}

/* One query token per row. q (B, KH, G, hd) contiguous: the G query heads that share KV head kh; keys and
 * values of row b, head kh start at k + b·kb + kh·kh_stride, one key of hd values per `hd` floats, S of
 * them; mask (B, S) bytes (1 = may attend) or NULL; out (B, KH, G, hd). Returns 0, or -2 when out of memory. */
int gemma3_decode_attention(const float *q, const float *k, const float *v, int64_t B, int64_t KH, int64_t G,
                            int64_t S, int64_t hd, int64_t kb, int64_t kh_stride, const uint8_t *mask, float scale,
                            float *out) {
  int64_t P = (S + KEY_PART - 1) / KEY_PART;
  if (P < 1) P = 1;
  int64_t items = B * KH;
  float *o = malloc(sizeof(float) * (size_t)(items * P * G * (hd + 2)));
  float *sc = malloc(sizeof(float) * (size_t)(items * P * G * KEY_PART));
  if (!o || !sc) {
    free(o); free(sc);
    return -2;
  }
  float *mx = o + items * P * G * hd, *l = mx + items * P * G;
#pragma omp parallel for schedule(static) if (items * P > 1 && S * hd * G * items >= (1 << 16))
  for (int64_t w = 0; w < items * P; w++) {
    int64_t it = w / P, part = w % P, b = it / KH, kh = it % KH;
    const uint8_t *m = mask ? mask + b * S : 0;
    if (part >= gemma3_attend_parts(m, S)) continue;
    gemma3_attend_part(q + it * G * hd, k + b * kb + kh * kh_stride, v + b * kb + kh * kh_stride, 0, m, S, G, hd, scale,
                       part, sc + w * G * KEY_PART, o + w * G * hd, mx + w * G, l + w * G);
  }
  for (int64_t it = 0; it < items; it++) {
    const uint8_t *m = mask ? mask + (it / KH) * S : 0;
    gemma3_attend_combine(G, hd, gemma3_attend_parts(m, S), o + it * P * G * hd, mx + it * P * G, l + it * P * G,
                          out + it * G * hd);
  }
  free(o); free(sc);
  return 0;
}
