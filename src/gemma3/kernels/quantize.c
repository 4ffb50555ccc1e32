/* Float weights to ggml blocks, for `--quantize` (gemma3/accel/quantize.py): Q8_0 as gguf-py and ggml's reference
 * quantizer make it (the same bytes, faster than gguf-py: docs/performance.md), and Q4_1 (4-bit codes,
 * an fp16 scale d and min m per 32 values: value = code · d + m) with the grid chosen per block by a
 * least-squares search.
 *
 * Q8_0: d = max|x| / 127 and codes round(x / d) (half away from zero, computed as x · (1/d) in fp32, as gguf-py
 * does), d stored as fp16 (round to nearest even). Nothing else: it is what every Q8_0 file holds.
 *
 * Why a search: gguf-py's (and llama.cpp's reference) Q4_1 takes m = min(x) and d = (max - min) / 15, which
 * spends the 16 levels on the two extremes: on the 270M it loses more than twice the perplexity this fit loses
 * with the same format and kernel (docs/quantized-inference.md, "Accuracy"). For each block, as llama.cpp's
 * make_qkx2_quants does for its K-quants:
 *   - candidate grids: d = range / (15 + r) for r = -1, -0.9, ..., +1 (and the plain min/max grid), codes
 *     q = round((x - min) / d) clamped to 0..15;
 *   - for each, the d and m that minimise Σ w (q·d + m - x)² for those codes (a 2 × 2 linear solve), and its
 *     error; the best is kept, then refined: codes again from the best (d, m), solved again, while it improves;
 *   - weights w = |x| + mean |x| of the block (llama.cpp's choice without an importance matrix: the large
 *     values, which carry the products, are fitted more closely), or, given an importance per column (the
 *     mean square of that input channel on calibration text, gemma3/accel/imatrix.py), w_j = imp_j · sqrt(mean x² +
 *     x_j²) as llama.cpp weighs its fits by an imatrix: an error costs what the inputs multiplying it make of
 *     it (what that buys: experiments/int4_ablation.py, docs/quantized-inference.md).
 * d and m are then rounded to fp16 and the codes taken once more from the rounded pair. All of it in double,
 * per block independently; `_fit_q4_1_torch` in quantize.py is the same arithmetic in torch (the fallback).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

#define QK 32
#define STEPS 20   /* r = -1 + 0.1 i, i = 0..STEPS */
#define REFINE 3

static void solve(const double *x, const double *w, const double *q, double *d, double *m, double *err) {
  double sw = 0, swq = 0, swq2 = 0, swx = 0, swxq = 0;
#pragma omp simd reduction(+ : sw, swq, swq2, swx, swxq)
  for (int j = 0; j < QK; j++) {
    sw += w[j];
    swq += w[j] * q[j];
    swq2 += w[j] * q[j] * q[j];
    swx += w[j] * x[j];
    swxq += w[j] * x[j] * q[j];
  }
  double det = sw * swq2 - swq * swq;
  if (det > 0) {
    *d = (sw * swxq - swq * swx) / det;
    *m = (swq2 * swx - swq * swxq) / det;
  }
  double e = 0;
#pragma omp simd reduction(+ : e)
  for (int j = 0; j < QK; j++) {
    double r = q[j] * *d + *m - x[j];
    e += w[j] * r * r;
  }
  *err = e;
}

static void codes(const double *x, double d, double m, double *q) {
  double inv = d != 0 ? 1.0 / d : 0;
#pragma omp simd
  for (int j = 0; j < QK; j++) {
    double c = nearbyint((x[j] - m) * inv);
    q[j] = c < 0 ? 0 : c > 15 ? 15 : c;
  }
}

static void fit_block(const float *xf, const float *imp, uint8_t *out) {
  double x[QK], w[QK], q[QK];
  double lo = xf[0], hi = xf[0], mean_abs = 0, s2 = 0;
  for (int j = 0; j < QK; j++) {
    x[j] = xf[j];
    lo = x[j] < lo ? x[j] : lo;
    hi = x[j] > hi ? x[j] : hi;
    mean_abs += fabs(x[j]);
    s2 += x[j] * x[j];
  }
  mean_abs /= QK;
  s2 /= QK;
  for (int j = 0; j < QK; j++) w[j] = imp ? imp[j] * sqrt(s2 + x[j] * x[j]) : fabs(x[j]) + mean_abs;
  double range = hi - lo, best_d = range / 15, best_m = lo, best_err = INFINITY;
  if (range > 0) {
    for (int i = -1; i <= STEPS; i++) {
      double d = range / (i < 0 ? 15.0 : 15.0 - 1.0 + 0.1 * i), m = lo, err;
      codes(x, d, lo, q);
      solve(x, w, q, &d, &m, &err);
      if (err < best_err) {
        best_err = err;
        best_d = d;
        best_m = m;
      }
    }
    for (int k = 0; k < REFINE; k++) {
      double d = best_d, m = best_m, err;
      codes(x, d, m, q);
      solve(x, w, q, &d, &m, &err);
      if (!(err < best_err)) break;
      best_err = err;
      best_d = d;
      best_m = m;
    }
  }
  uint16_t dh = _cvtss_sh((float)best_d, _MM_FROUND_TO_NEAREST_INT), mh = _cvtss_sh((float)best_m, _MM_FROUND_TO_NEAREST_INT);
  codes(x, _cvtsh_ss(dh), _cvtsh_ss(mh), q);
  memcpy(out, &dh, 2);
  memcpy(out + 2, &mh, 2);
  for (int j = 0; j < 16; j++) out[4 + j] = (uint8_t)((int)q[j] | (int)q[j + 16] << 4);
}

/* x: N rows of K floats (K a multiple of 32, finite, |x| ≤ 65504: the caller checks) → N · K/32 Q8_0 blocks of
 * 34 bytes. */
void gemma3_quantize_q8_0(const float *x, int64_t N, int64_t K, uint8_t *out) {
  int64_t blocks = N * (K / QK);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; b++) {
    const float *v = x + b * QK;
    uint8_t *o = out + b * 34;
    float amax = 0;
    for (int j = 0; j < QK; j++) amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;
    float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
    uint16_t dh = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
    memcpy(o, &dh, 2);
    for (int j = 0; j < QK; j++) {  /* roundf, written as gguf-py's np_roundf so that it vectorises */
      float y = v[j] * id, a = fabsf(y), f = floorf(a);
      o[2 + j] = (uint8_t)(int8_t)copysignf(f + floorf(2.0f * (a - f)), y);
    }
  }
}

/* x: N rows of K floats (K a multiple of 32, finite: the caller checks) → N · K/32 Q4_1 blocks of 20 bytes.
 * imp: NULL, or K positive weights, one per column, used as the fit's w (an importance matrix). */
void gemma3_fit_q4_1(const float *x, int64_t N, int64_t K, const float *imp, uint8_t *out) {
  int64_t blocks = N * (K / QK);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; b++) fit_block(x + b * QK, imp ? imp + (b * QK) % K : NULL, out + b * 20);
}
