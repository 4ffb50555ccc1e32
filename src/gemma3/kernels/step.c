/* One whole decode step of a quantized Gemma 3 model for one sequence, in one call: the embedding lookup,
 * every layer (norms, q/k/v, QK-norm, RoPE, the KV-cache write, attention, o, the GeGLU MLP, residuals), the
 * final norm and the tied output head. gemma3/decode_step.py builds the descriptors below from the model's
 * swapped-in modules (gemma3/quantize.py) and calls this in place of `model(token, cache=...)`.
 *
 * Why: the same step through the modules is ~700 dispatched ops (each a ctypes or torch call costing
 * microseconds in Python) around 127 matrix products and 18 attentions; measured on the 2-core test machine
 * that overhead was a third of the step. Here the products, norms and attention are the very functions the
 * modules call (quants.c, decode.c), so each output is the same bits as the module path; only GELU (decode.c's
 * vectorised form here, torch's there) differs, by an ulp or two.
 *
 * Threads: one OpenMP region for the whole step. Each matrix product splits its output rows across the
 * threads (q, k and v as one range of rows, gate and up as another), the attention splits its query heads;
 * the small elementwise work between them runs on one thread (`single`), and barriers keep the order. An
 * output row is computed by one thread with row_dots, whatever the thread count: 1 and 2 threads give the
 * same bits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* from quants.c and decode.c */
size_t gemma3_q_act_bytes(int64_t M, int64_t K);
void gemma3_q_act_prepare(const float *x, int64_t M, int64_t K, void *scratch);
void gemma3_q_rows(int fmt, const uint8_t *w, int64_t row_bytes, int64_t lo, int64_t hi, const void *act, int M,
                   float *y, int64_t ldy);
int gemma3_q_dequantize(int fmt, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const int64_t *ids,
                        int64_t R, float *out);
void gemma3_rms_norm(const float *x, const float *gain, int64_t rows, int64_t dim, float eps, float *out);
void gemma3_gelu_tanh_mul(const float *g, const float *u, int64_t n, float *out);
int64_t gemma3_attend_key_part(void);
int64_t gemma3_attend_parts(const uint8_t *m, int64_t S);
void gemma3_attend_part(const float *q, const void *kk, const void *vv, int64_t half, const uint8_t *m, int64_t S,
                        int64_t G, int64_t hd, float scale, int64_t part, float *sc, float *o, float *mx, float *l);
void gemma3_store_kv(const float *x, int64_t n, void *dst, int64_t half);
void gemma3_attend_combine(int64_t G, int64_t hd, int64_t parts, const float *o, const float *mx, const float *l,
                           float *out);

/* The layouts below are mirrored by ctypes Structures in gemma3/decode_step.py: change both together. */
typedef struct {
  const uint8_t *w; /* (n, row_bytes) blocks */
  int64_t fmt, row_bytes, n, k;
} qmat_t;

typedef struct {
  qmat_t q, k, v, o, gate, up, down;
  const float *input_norm, *post_attn_norm, *pre_ffn_norm, *post_ffn_norm, *q_norm, *k_norm; /* (1 + w), fp32 */
  void *keys, *values; /* this sequence's cache: (kv_heads, slots, head_dim), contiguous, fp32 or fp16 */
  int64_t slots;
  int64_t kind; /* 0 sliding, 1 global: which of the step's slot / mask / rotation it uses */
} layer_t;

typedef struct {
  int64_t n_layers, d, heads, kv_heads, head_dim, ffn;
  float eps, attn_scale, embed_scale;
  int32_t kv_half; /* 1: the cache holds fp16 keys and values (decode.c load8), 0: fp32 */
  const layer_t *layers;
  const float *final_norm; /* (1 + w), fp32 */
  qmat_t embed; /* the tied embedding: looked up at the start, the output head at the end */
} model_t;

typedef struct {
  int64_t token;
  int64_t slot[2];          /* the slot this token's key and value go to, per kind */
  int64_t visible[2];       /* key slots the query may look at ([0, visible)), per kind */
  const uint8_t *mask[2];   /* (visible) bytes, 1 = may attend, per kind */
  const float *cos[2], *sin[2]; /* (head_dim) cos and signed sin (model.RotaryEmbedding), per kind */
} step_t;

/* this thread's share [lo, hi) of n rows */
static inline void share(int64_t n, int64_t *lo, int64_t *hi) {
  int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
  *lo = n * t / T;
  *hi = n * (t + 1) / T;
}

/* y[0 : Σn) = the products of up to three matrices with the same prepared activation, their outputs one
 * after another; the threads split the concatenated rows. */
static void products(const qmat_t *const *mats, int count, const void *act, float *y) {
  int64_t total = 0;
  for (int i = 0; i < count; i++) total += mats[i]->n;
  int64_t lo, hi;
  share(total, &lo, &hi);
  int64_t base = 0;
  for (int i = 0; i < count; i++) {
    const qmat_t *w = mats[i];
    int64_t a = lo > base ? lo - base : 0, b = hi - base < w->n ? hi - base : w->n;
    if (a < b) gemma3_q_rows((int)w->fmt, w->w, w->row_bytes, a, b, act, 1, y + base, w->n);
    base += w->n;
  }
}

/* x' = x·cos + rotate_half(x)·sin, as model.apply_rotary: x·cos + roll(x, hd/2)·signed_sin, the two products
 * rounded apart and then added (no fused multiply-add: this file is built as ISO C, -ffp-contract=off). */
static void rotate(float *x, int64_t hd, const float *cos, const float *sin, float *tmp) {
  int64_t half = hd / 2;
  for (int64_t i = 0; i < hd; i++) { /* roll(x, hd/2)[i] is x[i + half] in the first half, x[i - half] after */
    float a = x[i] * cos[i];
    float b = x[i < half ? i + half : i - half] * sin[i];
    tmp[i] = a + b;
  }
  memcpy(x, tmp, (size_t)hd * sizeof(float));
}

/* The residual add after a sandwich norm: x += rms_norm(o) · gain (o normalised in place). */
static void add_normed(float *x, float *o, const float *gain, int64_t d, float eps) {
  gemma3_rms_norm(o, gain, 1, d, eps, o);
  for (int64_t i = 0; i < d; i++) x[i] = x[i] + o[i];
}

/* logits (embed.n) for `s.token` at the step's position. Returns 0, -1 for a bad token or shape, -2 when out
 * of memory (nothing written to the cache then). */
int gemma3_decode_step(const model_t *m, const step_t *s, float *logits) {
  const int64_t d = m->d, H = m->heads, KH = m->kv_heads, hd = m->head_dim, F = m->ffn, G = H / KH;
  const int64_t kv_row = hd * (m->kv_half ? 2 : 4); /* bytes of one cached key or value */
  if (s->token < 0 || s->token >= m->embed.n || m->embed.k != d || G * KH != H) return -1;
  for (int64_t l = 0; l < m->n_layers; l++) { /* every write and read stays inside the layer's cache */
    const layer_t *L = m->layers + l;
    int kind = L->kind == 1;
    if (s->slot[kind] < 0 || s->slot[kind] >= L->slots || s->visible[kind] < 1 || s->visible[kind] > L->slots) return -1;
  }
  int64_t widest = d > H * hd ? d : H * hd;
  if (F > widest) widest = F;
  int64_t most_keys = s->visible[0] > s->visible[1] ? s->visible[0] : s->visible[1];
  const int64_t P = (most_keys + gemma3_attend_key_part() - 1) / gemma3_attend_key_part() + 1; /* parts, at most */
  size_t act_bytes = gemma3_q_act_bytes(1, widest);
  float *x = malloc(sizeof(float) * (size_t)(3 * d + (H + 2 * KH) * hd + H * hd + 2 * F + hd));
  /* per (KV head, part): scores G·KEY_PART, then partial sums G·hd, maxima G, sums G */
  float *scores = malloc(sizeof(float) * (size_t)(KH * P * G * (gemma3_attend_key_part() + hd + 2)));
  void *act = aligned_alloc(64, (act_bytes + 63) / 64 * 64);
  if (!x || !scores || !act) {
    free(x); free(scores); free(act);
    return -2;
  }
  float *h = x + d, *o = h + d, *qkv = o + d, *att = qkv + (H + 2 * KH) * hd, *gu = att + H * hd, *tmp = gu + 2 * F;
  float *q = qkv, *k = qkv + H * hd, *v = k + KH * hd;
  if (gemma3_q_dequantize((int)m->embed.fmt, m->embed.w, m->embed.row_bytes, m->embed.n, d, &s->token, 1, x)) {
    free(x); free(scores); free(act);
    return -1;
  }
  for (int64_t i = 0; i < d; i++) x[i] = x[i] * m->embed_scale;

#pragma omp parallel
  {
    for (int64_t l = 0; l < m->n_layers; l++) {
      const layer_t *L = m->layers + l;
      const int kind = (int)L->kind;
#pragma omp single
      {
        gemma3_rms_norm(x, L->input_norm, 1, d, m->eps, h);
        gemma3_q_act_prepare(h, 1, d, act);
      }
      const qmat_t *qkv_mats[3] = {&L->q, &L->k, &L->v};
      products(qkv_mats, 3, act, qkv);
#pragma omp barrier
#pragma omp single
      {
        gemma3_rms_norm(q, L->q_norm, H, hd, m->eps, q);
        gemma3_rms_norm(k, L->k_norm, KH, hd, m->eps, k);
        for (int64_t i = 0; i < H; i++) rotate(q + i * hd, hd, s->cos[kind], s->sin[kind], tmp);
        for (int64_t i = 0; i < KH; i++) {
          rotate(k + i * hd, hd, s->cos[kind], s->sin[kind], tmp);
          const int64_t at = (i * L->slots + s->slot[kind]) * kv_row;
          gemma3_store_kv(k + i * hd, hd, (char *)L->keys + at, m->kv_half);
          gemma3_store_kv(v + i * hd, hd, (char *)L->values + at, m->kv_half);
        }
      }
      /* the keys in parts of KEY_PART (decode.c): the threads share them, each part read once for all G heads
         of its KV head; then each KV head's parts are combined in order */
      const int64_t S = s->visible[kind], parts = gemma3_attend_parts(s->mask[kind], S);
      float *o_part = scores + KH * P * G * gemma3_attend_key_part(), *mx = o_part + KH * P * G * hd, *sums = mx + KH * P * G;
#pragma omp for schedule(static)
      for (int64_t w = 0; w < KH * parts; w++) {
        int64_t kh = w / parts;
        const int64_t head_bytes = kh * L->slots * kv_row;
        gemma3_attend_part(q + kh * G * hd, (const char *)L->keys + head_bytes, (const char *)L->values + head_bytes,
                           m->kv_half, s->mask[kind], S, G, hd, m->attn_scale, w % parts, scores + w * G * gemma3_attend_key_part(),
                           o_part + w * G * hd, mx + w * G, sums + w * G);
      }
#pragma omp single
      {
        for (int64_t kh = 0; kh < KH; kh++)
          gemma3_attend_combine(G, hd, parts, o_part + kh * parts * G * hd, mx + kh * parts * G, sums + kh * parts * G,
                                att + kh * G * hd);
        gemma3_q_act_prepare(att, 1, H * hd, act);
      }
      const qmat_t *o_mat[1] = {&L->o};
      products(o_mat, 1, act, o);
#pragma omp barrier
#pragma omp single
      {
        add_normed(x, o, L->post_attn_norm, d, m->eps);
        gemma3_rms_norm(x, L->pre_ffn_norm, 1, d, m->eps, h);
        gemma3_q_act_prepare(h, 1, d, act);
      }
      const qmat_t *gu_mats[2] = {&L->gate, &L->up};
      products(gu_mats, 2, act, gu);
#pragma omp barrier
#pragma omp single
      {
        gemma3_gelu_tanh_mul(gu, gu + F, F, gu);
        gemma3_q_act_prepare(gu, 1, F, act);
      }
      const qmat_t *down_mat[1] = {&L->down};
      products(down_mat, 1, act, o);
#pragma omp barrier
#pragma omp single
      {
        add_normed(x, o, L->post_ffn_norm, d, m->eps);
      }
    }
#pragma omp single
    {
      gemma3_rms_norm(x, m->final_norm, 1, d, m->eps, h);
      gemma3_q_act_prepare(h, 1, d, act);
    }
    const qmat_t *head[1] = {&m->embed};
    products(head, 1, act, logits);
  }
  free(x); free(scores); free(act);
  return 0;
}
