/* One whole decode step of a quantized Gemma 3 model for one sequence, in one call: the embedding lookup,
 * every layer (norms, q/k/v, QK-norm, RoPE, the KV-cache write, attention, o, the GeGLU MLP, residuals), the
 * final norm and the tied output head. gemma3/accel/fused_step.py builds the descriptors below from the model's
 * swapped-in modules (gemma3/accel/quantize.py) and calls this in place of `model(token, cache=...)`.
 *
 * Why: the same step through the modules is ~700 dispatched ops (each a ctypes or torch call costing
 * microseconds in Python) around 127 matrix products and 18 attentions, and on the 270M that overhead is a
 * large share of the step (docs/performance.md, "Figures the source comments used to quote"). Here the
 * products, norms and attention are the very functions the modules call (quants.c, decode.c), so each output
 * is the same bits as the module path (GELU too: a quantized model's modules call decode.c's GELU, accel/native.py).
 *
 * Threads: one OpenMP region for the whole step. Each matrix product splits its output rows across the
 * threads (q, k and v as one range of rows, gate and up as another), the attention splits its keys into
 * parts; the small elementwise work between them every thread does for itself (own_t below), so a layer has
 * five barriers, one after each product. An output row is computed by one thread with row_dots, whatever
 * the thread count: 1 and 2 threads give the same bits.
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

/* The layouts below are mirrored by ctypes Structures in gemma3/accel/fused_step.py: change both together. */
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

/* The residual add after a sandwich norm: x += rms_norm(o) · gain, the normed o in `tmp` (o is shared: read only). */
static void add_normed(float *x, const float *o, const float *gain, int64_t d, float eps, float *tmp) {
  gemma3_rms_norm(o, gain, 1, d, eps, tmp);
  for (int64_t i = 0; i < d; i++) x[i] = x[i] + tmp[i];
}

/* What each thread keeps for itself: its own copy of the residual stream and of everything computed from the
 * shared product outputs between two products (norms, QK-norm, RoPE, attention's combine, GELU, the rounded
 * activation). Both threads compute these from the same inputs with the same code into buffers of the same
 * layout and alignment, so the copies are the same bits; what that buys is the barriers: a layer waits only
 * for its five products' outputs (q/k/v, attention, o, gate/up, down), where one thread doing this work
 * while the other waited cost eleven. A barrier is cheap while a waiting thread spins, but under
 * OMP_WAIT_POLICY=PASSIVE each one sleeps and wakes, so there the count of barriers shows in the decode rate
 * (docs/quantized-inference.md, "The decode step in one call"). */
typedef struct {
  float *x, *h, *q, *k, *att, *g, *tmp;
  void *act;
} own_t;

static size_t rounded(size_t bytes) { return (bytes + 63) / 64 * 64; }

/* One thread's buffers in one fixed layout from `base` (64-byte aligned), each rounded up to 64 bytes, the
 * activation (act_bytes) last; returns the bytes they take. base NULL: only the size. */
static size_t own_layout(char *base, int64_t d, int64_t H, int64_t KH, int64_t hd, int64_t F, size_t act_bytes,
                         own_t *w) {
  float **parts[] = {&w->x, &w->h, &w->q, &w->k, &w->att, &w->g, &w->tmp};
  const int64_t sizes[] = {d, d, H * hd, KH * hd, H * hd, F, hd};
  size_t at = 0;
  for (int i = 0; i < 7; i++) {
    *parts[i] = base ? (float *)(base + at) : NULL;
    at += rounded(sizeof(float) * (size_t)sizes[i]);
  }
  w->act = base ? base + at : NULL;
  return at + rounded(act_bytes);
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
  const int64_t KP = gemma3_attend_key_part(), P = (most_keys + KP - 1) / KP + 1; /* parts, at most */
  const size_t act_bytes = gemma3_q_act_bytes(1, widest);
  own_t first;
  const size_t own = own_layout(NULL, d, H, KH, hd, F, act_bytes, &first);
  const int T = omp_get_max_threads();
  /* shared: the products' outputs, then per (KV head, part) of attention: scores G·KP, partial sums G·hd,
     maxima G, sums G */
  float *shared = malloc(sizeof(float) * (size_t)(d + (H + 2 * KH) * hd + 2 * F + KH * P * G * (KP + hd + 2)));
  char *mine = aligned_alloc(64, own * (size_t)T);
  if (!shared || !mine) {
    free(shared); free(mine);
    return -2;
  }
  float *o = shared, *qkv = o + d, *gu = qkv + (H + 2 * KH) * hd, *scores = gu + 2 * F;
  float *const o_part = scores + KH * P * G * KP, *const mx = o_part + KH * P * G * hd, *const sums = mx + KH * P * G;
  own_layout(mine, d, H, KH, hd, F, act_bytes, &first);
  if (gemma3_q_dequantize((int)m->embed.fmt, m->embed.w, m->embed.row_bytes, m->embed.n, d, &s->token, 1, first.x)) {
    free(shared); free(mine);
    return -1;
  }
  for (int64_t i = 0; i < d; i++) first.x[i] = first.x[i] * m->embed_scale;

#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num();
    own_t w;
    own_layout(mine + own * (size_t)t, d, H, KH, hd, F, act_bytes, &w);
    if (t) memcpy(w.x, first.x, sizeof(float) * (size_t)d); /* thread 0 wrote it before the region */
    for (int64_t l = 0; l < m->n_layers; l++) {
      const layer_t *L = m->layers + l;
      const int kind = (int)L->kind;
      gemma3_rms_norm(w.x, L->input_norm, 1, d, m->eps, w.h);
      gemma3_q_act_prepare(w.h, 1, d, w.act);
      const qmat_t *qkv_mats[3] = {&L->q, &L->k, &L->v};
      products(qkv_mats, 3, w.act, qkv);
#pragma omp barrier
      const float *v = qkv + (H + KH) * hd;
      gemma3_rms_norm(qkv, L->q_norm, H, hd, m->eps, w.q);
      gemma3_rms_norm(qkv + H * hd, L->k_norm, KH, hd, m->eps, w.k);
      for (int64_t i = 0; i < H; i++) rotate(w.q + i * hd, hd, s->cos[kind], s->sin[kind], w.tmp);
      for (int64_t i = 0; i < KH; i++) rotate(w.k + i * hd, hd, s->cos[kind], s->sin[kind], w.tmp);
      /* the keys in parts of KP (decode.c): the threads share them, each part read once for all G heads of its
         KV head. The new key and value are written by the thread that reads their part (or, where no part
         holds the slot, the last part's), before it reads it: no other thread touches that slot this step. */
      const int64_t S = s->visible[kind], parts = gemma3_attend_parts(s->mask[kind], S);
      const int64_t slot = s->slot[kind], slot_part = slot / KP < parts ? slot / KP : parts - 1;
#pragma omp for schedule(static)
      for (int64_t p = 0; p < KH * parts; p++) {
        const int64_t kh = p / parts, head_bytes = kh * L->slots * kv_row;
        if (p % parts == slot_part) {
          const int64_t at = (kh * L->slots + slot) * kv_row;
          gemma3_store_kv(w.k + kh * hd, hd, (char *)L->keys + at, m->kv_half);
          gemma3_store_kv(v + kh * hd, hd, (char *)L->values + at, m->kv_half);
        }
        gemma3_attend_part(w.q + kh * G * hd, (const char *)L->keys + head_bytes, (const char *)L->values + head_bytes,
                           m->kv_half, s->mask[kind], S, G, hd, m->attn_scale, p % parts, scores + p * G * KP,
                           o_part + p * G * hd, mx + p * G, sums + p * G);
      } /* the loop's barrier: every part is in */
      for (int64_t kh = 0; kh < KH; kh++)
        gemma3_attend_combine(G, hd, parts, o_part + kh * parts * G * hd, mx + kh * parts * G, sums + kh * parts * G,
                              w.att + kh * G * hd);
      gemma3_q_act_prepare(w.att, 1, H * hd, w.act);
      const qmat_t *o_mat[1] = {&L->o};
      products(o_mat, 1, w.act, o);
#pragma omp barrier
      add_normed(w.x, o, L->post_attn_norm, d, m->eps, w.h);
      gemma3_rms_norm(w.x, L->pre_ffn_norm, 1, d, m->eps, w.h);
      gemma3_q_act_prepare(w.h, 1, d, w.act);
      const qmat_t *gu_mats[2] = {&L->gate, &L->up};
      products(gu_mats, 2, w.act, gu);
#pragma omp barrier
      gemma3_gelu_tanh_mul(gu, gu + F, F, w.g);
      gemma3_q_act_prepare(w.g, 1, F, w.act);
      const qmat_t *down_mat[1] = {&L->down};
      products(down_mat, 1, w.act, o);
#pragma omp barrier
      add_normed(w.x, o, L->post_ffn_norm, d, m->eps, w.h);
    }
    gemma3_rms_norm(w.x, m->final_norm, 1, d, m->eps, w.h);
    gemma3_q_act_prepare(w.h, 1, d, w.act);
    const qmat_t *head[1] = {&m->embed};
    products(head, 1, w.act, logits);
  }
  free(shared); free(mine);
  return 0;
}
