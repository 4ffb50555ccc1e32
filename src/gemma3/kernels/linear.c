/* y = x · Wᵀ for a few rows of x (bf16 or fp32): the matrix-vector products of a batch-1 decode step.
 *
 * Why this exists: a decode step reads every weight once, so its speed is the rate at which the products
 * stream weights from memory. oneDNN's bf16 kernel on weights packed in its blocked layout, and MKL's fp32
 * GEMV on a transposed copy, read well below the rate of a plain sequential sum (docs/performance.md,
 * "Generation"). This loop walks each weight row front to back in nn.Linear's own (out, in) layout, so the
 * whole matrix is one sequential stream, and reads close to a plain sum.
 *
 * Numerics: products and sums in fp32, then (bf16) one rounding per output, nearest-even, as oneDNN and the
 * reference do. Only the order of the fp32 additions differs from torch's kernels: bf16 outputs differ by one
 * ulp on ~1 in 5 000; fp32 outputs are closer to an fp64 product than MKL's (1.5e-5 vs 1.2e-4 on the head).
 * With AVX-512 BF16 the bf16 products use VDPBF16PS, which treats denormal inputs as zero.
 *
 * Built by gemma3/kernels/__init__.py with the system C compiler (-O3 -march=native -fopenmp) on first
 * use and cached; OpenMP resolves to the runtime torch already loaded, so torch.set_num_threads applies.
 */
#include <stdint.h>
#include <string.h>
#include <immintrin.h>
#include <omp.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "needs AVX2 and FMA (x86-64-v3) or AVX-512 BF16"
#endif

#define MAX_ROWS 8  /* rows of x per call; more go to a GEMM */

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays a quiet NaN */
  u += 0x7FFFu + ((u >> 16) & 1u);                                           /* nearest, ties to even */
  return (uint16_t)(u >> 16);
}

/* The sum of the 8 lanes of an AVX2 accumulator (both kernels' AVX2 paths). */
static inline float hsum256(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

#if defined(__AVX512BF16__)
#define ISA 512
#define STEP 32 /* bf16 elements per vector step */
typedef __m512 acc_t;
static inline acc_t acc_zero(void) { return _mm512_setzero_ps(); }
static inline acc_t acc_add(acc_t a, acc_t b) { return _mm512_add_ps(a, b); }
static inline acc_t acc_dot(acc_t a, const uint16_t *w, const uint16_t *x) {
  return _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
}
static inline float acc_sum(acc_t a) { return _mm512_reduce_add_ps(a); }
#else /* AVX2 + FMA: widen bf16 to fp32 with a 16-bit shift */
#define ISA 256
#define STEP 8
typedef __m256 acc_t;
static inline acc_t acc_zero(void) { return _mm256_setzero_ps(); }
static inline acc_t acc_add(acc_t a, acc_t b) { return _mm256_add_ps(a, b); }
static inline __m256 widen(const uint16_t *p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline acc_t acc_dot(acc_t a, const uint16_t *w, const uint16_t *x) { return _mm256_fmadd_ps(widen(w), widen(x), a); }
static inline float acc_sum(acc_t a) { return hsum256(a); }
#endif

/* out[m] = w · x[m] for one bf16 weight row w (K elements) and M rows of x. */
static void row_dots_bf16(const void *wv, const void *xv, int64_t M, int64_t K, float *out) {
  const uint16_t *w = wv, *x = xv;
  int64_t body = K - K % STEP;
  if (M == 1) { /* the decode step: two accumulators hide the latency of the dot instruction */
    acc_t a0 = acc_zero(), a1 = acc_zero();
    int64_t i = 0;
    for (; i + 2 * STEP <= body; i += 2 * STEP) {
      a0 = acc_dot(a0, w + i, x + i);
      a1 = acc_dot(a1, w + i + STEP, x + i + STEP);
    }
    if (i < body) a0 = acc_dot(a0, w + i, x + i);
    out[0] = acc_sum(acc_add(a0, a1));
  } else {
    acc_t a[MAX_ROWS];
    for (int64_t m = 0; m < M; m++) a[m] = acc_zero();
    for (int64_t i = 0; i < body; i += STEP)
      for (int64_t m = 0; m < M; m++) a[m] = acc_dot(a[m], w + i, x + m * K + i);
    for (int64_t m = 0; m < M; m++) out[m] = acc_sum(a[m]);
  }
  for (int64_t i = body; i < K; i++) /* K not a multiple of the vector step */
    for (int64_t m = 0; m < M; m++) out[m] += bf16_to_f32(w[i]) * bf16_to_f32(x[m * K + i]);
}

/* The same for fp32 rows: FMA on 16 (AVX-512) or 8 (AVX2) floats, four accumulators for the decode step. */
#if defined(__AVX512F__)
#define FSTEP 16
typedef __m512 facc_t;
#define FZERO() _mm512_setzero_ps()
#define FFMA(a, w, x) _mm512_fmadd_ps(_mm512_loadu_ps(w), _mm512_loadu_ps(x), a)
#define FADD(a, b) _mm512_add_ps(a, b)
#define FSUM(a) _mm512_reduce_add_ps(a)
#else
#define FSTEP 8
typedef __m256 facc_t;
#define FZERO() _mm256_setzero_ps()
#define FFMA(a, w, x) _mm256_fmadd_ps(_mm256_loadu_ps(w), _mm256_loadu_ps(x), a)
#define FADD(a, b) _mm256_add_ps(a, b)
#define FSUM(a) hsum256(a)
#endif

static void row_dots_f32(const void *wv, const void *xv, int64_t M, int64_t K, float *out) {
  const float *w = wv, *x = xv;
  int64_t body = K - K % FSTEP;
  if (M == 1) {
    facc_t a0 = FZERO(), a1 = FZERO(), a2 = FZERO(), a3 = FZERO();
    int64_t i = 0;
    for (; i + 4 * FSTEP <= body; i += 4 * FSTEP) {
      a0 = FFMA(a0, w + i, x + i);
      a1 = FFMA(a1, w + i + FSTEP, x + i + FSTEP);
      a2 = FFMA(a2, w + i + 2 * FSTEP, x + i + 2 * FSTEP);
      a3 = FFMA(a3, w + i + 3 * FSTEP, x + i + 3 * FSTEP);
    }
    for (; i < body; i += FSTEP) a0 = FFMA(a0, w + i, x + i);
    out[0] = FSUM(FADD(FADD(a0, a1), FADD(a2, a3)));
  } else {
    facc_t a[MAX_ROWS];
    for (int64_t m = 0; m < M; m++) a[m] = FZERO();
    for (int64_t i = 0; i < body; i += FSTEP)
      for (int64_t m = 0; m < M; m++) a[m] = FFMA(a[m], w + i, x + m * K + i);
    for (int64_t m = 0; m < M; m++) out[m] = FSUM(a[m]);
  }
  for (int64_t i = body; i < K; i++)
    for (int64_t m = 0; m < M; m++) out[m] += w[i] * x[m * K + i];
}

int gemma3_kernel_isa(void) { return ISA; }
int gemma3_kernel_max_rows(void) { return MAX_ROWS; }

/* y (M, N) = x (M, K) · Wᵀ, where W (N, K) is given as `nseg` row blocks stacked along N (q, k and v, say,
 * without concatenating them): block s starts at seg_w[s] and has seg_rows[s] rows of K contiguous elements.
 * x and y are contiguous; 1 <= M <= MAX_ROWS. Threads (OpenMP) take contiguous ranges of the N rows. */
static void linear(int bf16, int64_t nseg, const void *const *seg_w, const int64_t *seg_rows, const void *x,
                   int64_t M, int64_t K, void *y) {
  size_t size = bf16 ? 2 : 4; /* bytes per element */
  int64_t N = 0;
  for (int64_t s = 0; s < nseg; s++) N += seg_rows[s];
  if (M < 1 || M > MAX_ROWS || N == 0) return;
#pragma omp parallel if (N * K >= (1 << 15))
  {
    int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t lo = N * t / T, hi = N * (t + 1) / T;
    if (lo < hi) {
      int64_t s = 0, base = 0; /* the block holding row lo, and the index of its first row */
      while (base + seg_rows[s] <= lo) base += seg_rows[s++];
      float out[MAX_ROWS];
      for (int64_t n = lo; n < hi; n++) {
        while (n - base >= seg_rows[s]) base += seg_rows[s++];
        const char *row = (const char *)seg_w[s] + (size_t)((n - base) * K) * size;
        if (bf16) {
          row_dots_bf16(row, x, M, K, out);
          for (int64_t m = 0; m < M; m++) ((uint16_t *)y)[m * N + n] = f32_to_bf16(out[m]);
        } else {
          row_dots_f32(row, x, M, K, out);
          for (int64_t m = 0; m < M; m++) ((float *)y)[m * N + n] = out[m];
        }
      }
    }
  }
}

void gemma3_linear_bf16(int64_t nseg, const void *const *seg_w, const int64_t *seg_rows, const void *x,
                        int64_t M, int64_t K, void *y) {
  linear(1, nseg, seg_w, seg_rows, x, M, K, y);
}

void gemma3_linear_f32(int64_t nseg, const void *const *seg_w, const int64_t *seg_rows, const void *x,
                       int64_t M, int64_t K, void *y) {
  linear(0, nseg, seg_w, seg_rows, x, M, K, y);
}
