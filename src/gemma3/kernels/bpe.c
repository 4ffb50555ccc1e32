// Gemma 3's tokenizer, encode side: the same ids as HF `tokenizers` running the official tokenizer.json, in
// a fraction of its memory and build time (docs/tokenizer.md has the figures; gemma3/text/native_bpe.py says why
// that matters).
//
// The official pipeline, step by step, and what does it here:
//   1. added tokens (6 415 CONTROL / USER_DEFINED / UNKNOWN pieces, all `normalized: false`) are matched in
//      the raw text, leftmost-longest (HF uses an Aho-Corasick automaton with MatchKind::LeftmostLongest):
//      `trie_match`, tried at every byte; the first position with a match wins, the longest match there.
//   2. between them, the normalizer replaces " " with "▁" (U+2581). The pre-tokenizer splits on " ", of
//      which none is left, so each stretch between added tokens is one BPE word.
//   3. BPE: the word starts as one symbol per character (its piece; else its UTF-8 bytes as <0xNN> pieces,
//      byte fallback; else <unk>), then the adjacent pair of lowest merge rank is merged, leftmost first on
//      ties, until no pair has a merge. HF keeps the pairs in a heap and drops entries gone stale; `bpe_word`
//      does the same with the same order (rank, then position), so the same merges happen in the same order.
//
// Tables (built by gemma3_bpe_new from the vocabulary the caller keeps alive; freed by gemma3_bpe_free):
//   pieces   open-addressing hash of the pieces' UTF-8 bytes -> id   (token_to_id, merge derivation)
//   chars    code point -> id of its one-character piece (dense, 0x110000 entries, 4.4 MB, mostly unmapped)
//   merges   (left id, right id) -> rank; the merged piece's id by rank
//   trie     the added tokens' bytes
// Nothing here reads past the lengths it is given; every allocation is checked (-1 = out of memory).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define N_CODEPOINTS 0x110000
#define EMPTY (-1)

typedef struct {
    int32_t first_child, next_sibling, token;  // token: id of the added token ending here, or -1
    uint8_t byte;
} trie_node;

typedef struct {
    int64_t n_pieces;
    const uint8_t *blob;    // the pieces' bytes, back to back (owned by the caller)
    const int64_t *offsets; // piece i is blob[offsets[i] : offsets[i + 1]]
    uint64_t *piece_slots;  // hash of pieces: slot -> (hash's high 32 bits << 32 | id + 1), 0 = empty
    uint64_t piece_mask;
    int32_t *chars;         // code point -> piece id + 1, or 0
    int32_t bytes[256];     // byte -> id of <0xNN>, or EMPTY
    int32_t unk;
    uint64_t *merge_keys;   // slot -> (left << 32 | right) + 1, 0 = empty
    int32_t *merge_ranks;   // slot -> rank
    uint64_t merge_mask;
    int32_t *merged;        // rank -> id of the merged piece
    int64_t n_merges;
    trie_node *trie;
    int64_t n_nodes, cap_nodes;
    int32_t root[256];      // first byte -> node, or EMPTY
} bpe_t;

#define FNV_BASIS 1469598103934665603ull
static uint64_t fnv(uint64_t h, uint8_t byte) { return (h ^ byte) * 1099511628211ull; }

static uint64_t mix(uint64_t h) {  // FNV-1a's low bits are weak: mix before masking
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    return h ^ (h >> 32);
}

static uint64_t hash_bytes(const uint8_t *s, int64_t n) {
    uint64_t h = FNV_BASIS;
    for (int64_t i = 0; i < n; i++) h = fnv(h, s[i]);
    return mix(h);
}

static uint64_t hash_pair(uint64_t key) {
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdull;
    key ^= key >> 33;
    key *= 0xc4ceb9fe1a85ec53ull;
    return key ^ (key >> 33);
}

static uint64_t table_size(int64_t n) {  // a power of two at least twice n
    uint64_t size = 16;
    while (size < (uint64_t)n * 2) size <<= 1;
    return size;
}

// id of the piece spelled s[0:n] whose hash_bytes is `hash`, or EMPTY
static int32_t piece_id_hashed(const bpe_t *t, const uint8_t *s, int64_t n, uint64_t hash) {
    uint64_t tag = hash >> 32 << 32;  // compared first: a miss rarely reads the pieces themselves
    for (uint64_t slot = hash & t->piece_mask;; slot = (slot + 1) & t->piece_mask) {
        uint64_t entry = t->piece_slots[slot];
        if (!entry) return EMPTY;
        if ((entry & ~0xffffffffull) != tag) continue;
        int32_t id = (int32_t)(entry & 0xffffffffull) - 1;
        int64_t len = t->offsets[id + 1] - t->offsets[id];
        if (len == n && memcmp(t->blob + t->offsets[id], s, (size_t)n) == 0) return id;
    }
}

static int32_t piece_id(const bpe_t *t, const uint8_t *s, int64_t n) {
    return piece_id_hashed(t, s, n, hash_bytes(s, n));
}

int64_t gemma3_bpe_token_to_id(const bpe_t *t, const uint8_t *s, int64_t n) { return piece_id(t, s, n); }

// Length of the UTF-8 sequence starting with byte b (1 for a stray continuation byte: never split inside).
static int utf8_len(uint8_t b) { return b < 0x80 ? 1 : b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : b >= 0xC0 ? 2 : 1; }

static int64_t decode_cp(const uint8_t *s, int len) {
    switch (len) {
    case 1: return s[0];
    case 2: return (int64_t)(s[0] & 0x1F) << 6 | (s[1] & 0x3F);
    case 3: return (int64_t)(s[0] & 0x0F) << 12 | (int64_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F);
    default: return (int64_t)(s[0] & 0x07) << 18 | (int64_t)(s[1] & 0x3F) << 12 | (int64_t)(s[2] & 0x3F) << 6 |
                    (s[3] & 0x3F);
    }
}

static int add_trie(bpe_t *t, const uint8_t *s, int64_t n, int32_t token) {
    if (n <= 0) return 0;
    if (t->n_nodes + n > t->cap_nodes) {  // room for the whole token first: no pointer into the trie moves below
        int64_t cap = t->cap_nodes ? t->cap_nodes : 1024;
        while (cap < t->n_nodes + n) cap *= 2;
        trie_node *grown = realloc(t->trie, (size_t)cap * sizeof *grown);
        if (!grown) return -1;
        t->trie = grown;
        t->cap_nodes = cap;
    }
    int32_t *link = &t->root[s[0]];
    int32_t node = EMPTY;
    for (int64_t i = 0; i < n; i++) {
        if (i > 0) link = &t->trie[node].first_child;
        while (*link != EMPTY && t->trie[*link].byte != s[i]) link = &t->trie[*link].next_sibling;
        if (*link == EMPTY) {  // a new child for s[i], last among its siblings
            *link = (int32_t)t->n_nodes;
            t->trie[t->n_nodes++] = (trie_node){EMPTY, EMPTY, EMPTY, s[i]};
        }
        node = *link;
    }
    if (t->trie[node].token == EMPTY) t->trie[node].token = token;  // the first of equal contents wins
    return 0;
}

// The longest added token starting at s (length in *len), or EMPTY.
static int32_t trie_match(const bpe_t *t, const uint8_t *s, int64_t n, int64_t *len) {
    int32_t best = EMPTY, node = t->root[s[0]];
    for (int64_t i = 0; node != EMPTY;) {
        if (t->trie[node].token != EMPTY) {
            best = t->trie[node].token;
            *len = i + 1;
        }
        if (++i == n) break;
        int32_t child = t->trie[node].first_child;
        while (child != EMPTY && t->trie[child].byte != s[i]) child = t->trie[child].next_sibling;
        node = child;
    }
    return best;
}

void gemma3_bpe_free(bpe_t *t) {
    if (!t) return;
    free(t->piece_slots);
    free(t->chars);
    free(t->merge_keys);
    free(t->merge_ranks);
    free(t->merged);
    free(t->trie);
    free(t);
}

// The tables for n pieces (blob/offsets: see bpe_t; the caller keeps both alive and unchanged), <unk> = unk.
// Returns NULL when out of memory, or with *duplicate = the id of a piece spelled like an earlier one.
bpe_t *gemma3_bpe_new(int64_t n, const uint8_t *blob, const int64_t *offsets, int32_t unk, int64_t *duplicate) {
    *duplicate = -1;
    bpe_t *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->n_pieces = n;
    t->blob = blob;
    t->offsets = offsets;
    t->unk = unk;
    uint64_t size = table_size(n);
    t->piece_mask = size - 1;
    t->piece_slots = calloc(size, sizeof(uint64_t));
    t->chars = calloc(N_CODEPOINTS, sizeof(int32_t));  // id + 1; pages without one-character pieces stay unmapped
    if (!t->piece_slots || !t->chars) goto fail;
    memset(t->bytes, 0xff, sizeof t->bytes);
    memset(t->root, 0xff, sizeof t->root);
    for (int64_t id = 0; id < n; id++) {
        const uint8_t *s = blob + offsets[id];
        int64_t len = offsets[id + 1] - offsets[id];
        if (piece_id(t, s, len) != EMPTY) {
            *duplicate = id;
            goto fail;
        }
        uint64_t hash = hash_bytes(s, len), slot = hash & t->piece_mask;
        while (t->piece_slots[slot]) slot = (slot + 1) & t->piece_mask;
        t->piece_slots[slot] = hash >> 32 << 32 | (uint64_t)(id + 1);
        if (len > 0 && utf8_len(s[0]) == len && (s[0] & 0xC0) != 0x80) {
            int64_t cp = decode_cp(s, (int)len);
            if (cp < N_CODEPOINTS) t->chars[cp] = (int32_t)id + 1;
        }
        static const char hex[] = "0123456789ABCDEF";  // HF looks up format!("<{:#04X}>", byte): "<0x0A>"
        if (len == 6 && memcmp(s, "<0x", 3) == 0 && s[5] == '>' && s[3] && s[4]) {
            const char *hi = memchr(hex, s[3], 16), *lo = memchr(hex, s[4], 16);
            if (hi && lo) t->bytes[(hi - hex) * 16 + (lo - hex)] = (int32_t)id;
        }
    }
    return t;
fail:
    gemma3_bpe_free(t);
    return NULL;
}

// An added token: s[0:n] matched whole in raw text, before anything else, as token `id`. 0, or -1.
int gemma3_bpe_add_token(bpe_t *t, const uint8_t *s, int64_t n, int32_t id) { return add_trie(t, s, n, id); }

// Every split of a piece into two pieces, at a character boundary: the candidate merges. Fills left, right,
// owner (the piece they make) and left_chars (the left part's length in characters, which ranks the merge),
// at most cap of them (none with cap 0). Returns how many there are: call again with more room if that is
// more than cap.
int64_t gemma3_bpe_splits(const bpe_t *t, int64_t cap, int32_t *left, int32_t *right, int32_t *owner,
                          int32_t *left_chars) {
    int64_t count = 0;
    for (int64_t id = 0; id < t->n_pieces; id++) {
        const uint8_t *s = t->blob + t->offsets[id];
        int64_t len = t->offsets[id + 1] - t->offsets[id], chars = 0, hashed = 0;
        uint64_t h = FNV_BASIS;  // of s[0:hashed], extended as k grows
        for (int64_t k = len > 0 ? utf8_len(s[0]) : 0; k < len; k += utf8_len(s[k])) {
            chars++;
            for (; hashed < k; hashed++) h = fnv(h, s[hashed]);
            int32_t a = piece_id_hashed(t, s, k, mix(h));
            if (a == EMPTY) continue;
            int32_t b = piece_id(t, s + k, len - k);
            if (b == EMPTY) continue;
            if (count < cap) {
                left[count] = a;
                right[count] = b;
                owner[count] = (int32_t)id;
                left_chars[count] = (int32_t)chars;
            }
            count++;
        }
    }
    return count;
}

// The merges in rank order (rank = index): left[r] + right[r] -> merged[r]. A pair listed twice keeps its
// last rank, as HF's merge map does (it collects the ordered list into a hash map). 0, or -1 out of memory.
int gemma3_bpe_set_merges(bpe_t *t, int64_t m, const int32_t *left, const int32_t *right, const int32_t *merged) {
    uint64_t size = table_size(m);
    free(t->merge_keys);
    free(t->merge_ranks);
    free(t->merged);
    t->merge_keys = calloc(size, sizeof(uint64_t));
    t->merge_ranks = malloc(size * sizeof(int32_t));
    t->merged = malloc((size_t)(m > 0 ? m : 1) * sizeof(int32_t));
    if (!t->merge_keys || !t->merge_ranks || !t->merged) return -1;
    t->merge_mask = size - 1;
    t->n_merges = m;
    for (int64_t r = 0; r < m; r++) {
        uint64_t key = ((uint64_t)(uint32_t)left[r] << 32 | (uint32_t)right[r]) + 1;
        uint64_t slot = hash_pair(key) & t->merge_mask;
        while (t->merge_keys[slot] && t->merge_keys[slot] != key) slot = (slot + 1) & t->merge_mask;
        t->merge_keys[slot] = key;
        t->merge_ranks[slot] = (int32_t)r;
        t->merged[r] = merged[r];
    }
    return 0;
}

static int32_t merge_rank(const bpe_t *t, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    for (uint64_t slot = hash_pair(key) & t->merge_mask;; slot = (slot + 1) & t->merge_mask) {
        uint64_t k = t->merge_keys[slot];
        if (k == key) return t->merge_ranks[slot];
        if (!k) return EMPTY;
    }
}

typedef struct { int32_t rank, pos; } entry;  // a pair (pos, next[pos]) that had merge `rank` when pushed

static int before(entry a, entry b) { return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos); }

static void push(entry *heap, int64_t *n, entry e) {
    int64_t i = (*n)++;
    while (i > 0 && before(e, heap[(i - 1) / 2])) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = e;
}

static entry pop(entry *heap, int64_t *n) {
    entry top = heap[0], last = heap[--*n];
    int64_t i = 0;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && before(heap[c + 1], heap[c])) c++;
        if (!before(heap[c], last)) break;
        heap[i] = heap[c];
        i = c;
    }
    if (*n) heap[i] = last;
    return top;
}

typedef struct {
    int32_t *id, *prev, *next;
    entry *heap;
    int64_t cap, heap_cap;
} scratch;

static int reserve(scratch *w, int64_t symbols) {  // room for a word of `symbols` symbols; 0, or -1
    if (symbols > w->cap) {
        free(w->id);
        free(w->prev);
        free(w->next);
        w->id = malloc((size_t)symbols * sizeof(int32_t));
        w->prev = malloc((size_t)symbols * sizeof(int32_t));
        w->next = malloc((size_t)symbols * sizeof(int32_t));
        w->cap = w->id && w->prev && w->next ? symbols : 0;
        if (!w->cap) return -1;
    }
    // the heap holds the first pairs (symbols - 1) and at most two new pairs per merge (symbols - 1 merges)
    if (3 * symbols > w->heap_cap) {
        free(w->heap);
        w->heap = malloc((size_t)(3 * symbols) * sizeof(entry));
        w->heap_cap = w->heap ? 3 * symbols : 0;
        if (!w->heap) return -1;
    }
    return 0;
}

static const uint8_t space_mark[3] = {0xE2, 0x96, 0x81};  // "▁", what the normalizer makes of " "

// Symbols of the word s[0:n] before any merge: one per character (its piece), else one per UTF-8 byte
// (<0xNN>), else one <unk> per run of such characters. Writes them to ids when it is not NULL; returns
// how many.
static int64_t initial_symbols(const bpe_t *t, const uint8_t *s, int64_t n, int32_t *ids) {
    int64_t m = 0;
    int unknown_run = 0;
    for (int64_t i = 0; i < n;) {
        int len = utf8_len(s[i]);
        if (len > n - i) len = (int)(n - i);
        const uint8_t *c = s + i;
        i += len;
        if (c[0] == ' ') {
            c = space_mark;
            len = 3;
        }
        int64_t cp = len == utf8_len(c[0]) && (c[0] & 0xC0) != 0x80 ? decode_cp(c, len) : -1;
        int32_t id = cp >= 0 && cp < N_CODEPOINTS ? t->chars[cp] - 1 : EMPTY;
        int all = id == EMPTY;
        for (int k = 0; all && k < len; k++) all = t->bytes[c[k]] != EMPTY;
        if (id != EMPTY) {
            if (ids) ids[m] = id;
            m++;
        } else if (all) {
            for (int k = 0; k < len; k++, m++)
                if (ids) ids[m] = t->bytes[c[k]];
        } else if (!unknown_run) {  // fuse_unk: a run of characters with neither is one <unk>
            if (ids) ids[m] = t->unk;
            m++;
        }
        unknown_run = id == EMPTY && !all;
    }
    return m;
}

// BPE of one word; its ids appended at out + *count (at most cap in all). 0, -1 out of memory, -2 no room.
static int bpe_word(const bpe_t *t, const uint8_t *s, int64_t n, scratch *w, int32_t *out, int64_t cap,
                    int64_t *count) {
    if (reserve(w, initial_symbols(t, s, n, NULL))) return -1;
    int64_t m = initial_symbols(t, s, n, w->id), heap_n = 0;
    for (int64_t i = 0; i < m; i++) {
        w->prev[i] = (int32_t)i - 1;
        w->next[i] = i + 1 < m ? (int32_t)i + 1 : EMPTY;
    }
    for (int64_t i = 0; i + 1 < m; i++) {
        int32_t r = merge_rank(t, w->id[i], w->id[i + 1]);
        if (r != EMPTY) push(w->heap, &heap_n, (entry){r, (int32_t)i});
    }
    while (heap_n) {
        entry e = pop(w->heap, &heap_n);
        int32_t p = e.pos, q = w->next[p];
        if (w->id[p] == EMPTY || q == EMPTY) continue;              // merged away, or now the last symbol
        if (merge_rank(t, w->id[p], w->id[q]) != e.rank) continue;  // the pair changed since it was pushed
        w->id[p] = t->merged[e.rank];
        w->id[q] = EMPTY;
        w->next[p] = w->next[q];
        if (w->next[q] != EMPTY) w->prev[w->next[q]] = p;
        if (w->prev[p] != EMPTY) {
            int32_t r = merge_rank(t, w->id[w->prev[p]], w->id[p]);
            if (r != EMPTY) push(w->heap, &heap_n, (entry){r, w->prev[p]});
        }
        if (w->next[p] != EMPTY) {
            int32_t r = merge_rank(t, w->id[p], w->id[w->next[p]]);
            if (r != EMPTY) push(w->heap, &heap_n, (entry){r, p});
        }
    }
    for (int64_t i = 0; m > 0 && i != EMPTY; i = w->next[i]) {
        if (*count == cap) return -2;
        out[(*count)++] = w->id[i];
    }
    return 0;
}

// Ids of text[0:n] (UTF-8) into out[0:cap]. Returns the count; -1 out of memory; -2 when cap is too small
// (n + 1 is enough unless "▁" is not a piece, or characters fall back to bytes: 3 * n + 1 always is).
int64_t gemma3_bpe_encode(const bpe_t *t, const uint8_t *text, int64_t n, int32_t *out, int64_t cap) {
    scratch w = {0};
    int64_t count = 0, start = 0;
    int rc = 0;
    for (int64_t i = 0; i < n && !rc;) {
        int64_t len = 0;
        int32_t token = t->n_nodes ? trie_match(t, text + i, n - i, &len) : EMPTY;
        if (token == EMPTY) {
            i++;
            continue;
        }
        if (i > start) rc = bpe_word(t, text + start, i - start, &w, out, cap, &count);
        if (!rc && count == cap) rc = -2;
        if (!rc) out[count++] = token;
        i += len;
        start = i;
    }
    if (!rc && n > start) rc = bpe_word(t, text + start, n - start, &w, out, cap, &count);
    free(w.id);
    free(w.prev);
    free(w.next);
    free(w.heap);
    return rc ? rc : count;
}
