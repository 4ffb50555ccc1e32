/* The small fp32 operations of a decode step, fused: RMSNorm and one token's attention over the KV cache.
 *
 * Why: a 270M decode step runs 109 norms and 18 attentions on tiny tensors (640 or 4 × 256 values, one
 * query per head). In eager torch each is several dispatched ops: measured on our 2-core AMD EPYC test
 * machine (torch 2.13), F.rms_norm on 640 values takes 30-40 µs and SDPA for 4 query heads over 512 cached
 * keys 110-380 µs, together ~13 ms of a ~50 ms quantized step — more than the layers' weight reads. Here each
 * is one call (~2 µs of ctypes and allocation plus the arithmetic). gemma3/packed.py swaps them in.
 *
 * Numerics: fp32 throughout, as torch's kernels, summing in a different order (results agree to a few ulp).
 * Attention: exact two-pass softmax (max, then exp and sum), masked keys skipped; a query that may see no key
 * gets NaN, as SDPA gives.
 */
#include <math.h>
#include <stdint.h>
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

/* exp(x) for x <= 0 (softmax arguments after subtracting the max), 8 at a time: x = n·ln2 + r with
 * |r| <= ln2/2 (ln2 split in two parts for an exact reduction), exp(r) by its degree-6 Taylor polynomial
 * (relative error < 2e-7, about glibc's expf), times 2^n built in the exponent bits; below -87.3, 0.
 * glibc's scalar expf costs ~20 ns a call here, 2 048 calls a layer for the 270M. */
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
/* The attention of G query heads qi (G, hd) that share one KV head: keys kk and values vv (S of them, hd
 * floats apart), mask m (S bytes, 1 = may attend) or NULL; scratch sc of G·S floats; out o (G, hd). A head's
 * result does not depend on G (the fused decode step, step.c, calls this one head at a time). */
void gemma3_attend_heads(const float *qi, const float *kk, const float *vv, const uint8_t *m, int64_t S, int64_t G,
                         int64_t hd, float scale, float *sc, float *o) {
  int dead[G]; /* heads that may see no key */
  /* Keys past the row's last visible one are left out, not summed as zeros: the vector/tail split of the
   * sums below then depends only on this row's keys, so a row's result is the same bits whatever the
   * other rows of the batch hold (a batched server's rows equal the same request run alone). */
  int64_t Sr = S;
  if (m) while (Sr > 0 && !m[Sr - 1]) Sr--;
  for (int64_t s = 0; s < Sr; s++) {
    if (m && !m[s]) continue;
    for (int64_t g = 0; g < G; g++) sc[g * Sr + s] = dot(qi + g * hd, kk + s * hd, hd) * scale;
  }
  for (int64_t g = 0; g < G; g++) {
    float mx = -INFINITY, total = 0.0f, *sg = sc + g * Sr;
    for (int64_t s = 0; s < Sr; s++) {
      if (m && !m[s]) sg[s] = -INFINITY; /* exp → 0 */
      else if (sg[s] > mx) mx = sg[s];
    }
    dead[g] = mx == -INFINITY;
    if (dead[g]) { /* its output is NaN, as SDPA's, set below */
      for (int64_t s = 0; s < Sr; s++) sg[s] = 0.0f;
      continue;
    }
    __m256 vmx = _mm256_set1_ps(mx), vt = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= Sr; s += 8) {
      __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sg + s), vmx));
      _mm256_storeu_ps(sg + s, e);
      vt = _mm256_add_ps(vt, e);
    }
    total = hsum8(vt);
    for (; s < Sr; s++) total += (sg[s] = sg[s] == -INFINITY ? 0.0f : expf(sg[s] - mx));
    float inv = 1.0f / total;
    for (s = 0; s < Sr; s++) sg[s] *= inv;
  }
  /* out_g = Σ_s p_gs · v_s, 16 dims of up to 4 heads at a time in registers, each value row read once */
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    int64_t gn = G - g0 < 4 ? G - g0 : 4;
    int64_t c = 0;
    for (; c + 16 <= hd; c += 16) {
      __m256 a[4][2];
      for (int gi = 0; gi < 4; gi++) a[gi][0] = a[gi][1] = _mm256_setzero_ps();
      for (int64_t s = 0; s < Sr; s++) {
        if (m && !m[s]) continue;
        __m256 v0 = _mm256_loadu_ps(vv + s * hd + c), v1 = _mm256_loadu_ps(vv + s * hd + c + 8);
        for (int gi = 0; gi < gn; gi++) {
          __m256 p = _mm256_set1_ps(sc[(g0 + gi) * Sr + s]);
          a[gi][0] = _mm256_fmadd_ps(p, v0, a[gi][0]);
          a[gi][1] = _mm256_fmadd_ps(p, v1, a[gi][1]);
        }
      }
      for (int gi = 0; gi < gn; gi++) {
        _mm256_storeu_ps(o + (g0 + gi) * hd + c, a[gi][0]);
        _mm256_storeu_ps(o + (g0 + gi) * hd + c + 8, a[gi][1]);
      }
    }
    for (; c < hd; c++)
      for (int gi = 0; gi < gn; gi++) {
        float acc = 0.0f;
        for (int64_t s = 0; s < Sr; s++)
          if (!m || m[s]) acc += sc[(g0 + gi) * Sr + s] * vv[s * hd + c];
        o[(g0 + gi) * hd + c] = acc;
      }
  }
  for (int64_t g = 0; g < G; g++)
    if (dead[g])
      for (int64_t i = 0; i < hd; i++) o[g * hd + i] = NAN;
}

/* One query token per row. q (B, KH, G, hd) contiguous: the G query heads that share KV head kh; keys and
 * values of row b, head kh start at k + b·kb + kh·kh_stride, one key of hd values per `hd` floats, S of
 * them; mask (B, S) bytes (1 = may attend) or NULL; out (B, KH, G, hd). `scores` is scratch of
 * B·KH·G·S floats. Each key and value is read once for all G query heads that share it (they are the
 * bytes that count: 2 × 512 × 256 fp32 = 1 MiB a layer for the 270M at a full window). */
void gemma3_decode_attention(const float *q, const float *k, const float *v, int64_t B, int64_t KH, int64_t G,
                             int64_t S, int64_t hd, int64_t kb, int64_t kh_stride, const uint8_t *mask, float scale,
                             float *scores, float *out) {
  int64_t items = B * KH;
#pragma omp parallel for schedule(static) if (items > 1 && S * hd * G * items >= (1 << 16))
  for (int64_t it = 0; it < items; it++) {
    int64_t b = it / KH, kh = it % KH;
    gemma3_attend_heads(q + it * G * hd, k + b * kb + kh * kh_stride, v + b * kb + kh * kh_stride,
                        mask ? mask + b * S : 0, S, G, hd, scale, scores + it * G * S, out + it * G * hd);
  }
}
