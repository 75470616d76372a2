/* CPU kernels for the autoencoder's sparse steps, in fp32, called through ctypes by
 * mlsae/model/native.py, which compiles this file on first use.
 *
 * mlsae_topk selects the k largest pre-activations of each row with one vectorised pass
 * over it. mlsae_sparse_backward is memory-bound: every entry (a vector's selected latent)
 * gathers rows of 2 KiB (at 512 inputs) from tables of several MiB, so it blocks the work
 * so that the rows gathered most often stay in a core's L2 cache, and prefetches. Each
 * output element is summed by one thread in a fixed order, so results do not depend on
 * the number of threads.
 *
 * The kernels run on torch's OpenMP threads where native.py finds its runtime, else on
 * threads of their own. Every function returns 0 on success, 1 for an index out of range,
 * 2 when memory could not be had, 3 for a k out of range.
 */

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define MAX_THREADS 256

/* The widest vector of floats the target has registers for. Wider GCC vectors are split
 * into registers by the compiler, badly: on AVX2, 16-float vectors went through the stack
 * and made the backward 7x slower. */
#if defined(__AVX512F__)
#define VEC_FLOATS 16
#elif defined(__AVX__)
#define VEC_FLOATS 8
#else
#define VEC_FLOATS 4
#endif
typedef float vec __attribute__((vector_size(VEC_FLOATS * sizeof(float))));
static inline vec load_vec(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void store_vec(float *p, vec v) { memcpy(p, &v, sizeof v); }
static inline vec broadcast(float x) { return (vec){0} + x; }

#if defined(__AVX2__) && !defined(__AVX512F__)
/* AVX2 has no compress-store: compress8 packs the lanes of a mask to the front by a
 * permutation looked up by the mask, and stores all 8 lanes (the caller leaves room). */
static int32_t compress_permutations[256][8];
__attribute__((constructor)) static void fill_compress_permutations(void) {
    for (int mask = 0; mask < 256; mask++) {
        int n = 0;
        for (int lane = 0; lane < 8; lane++)
            if (mask >> lane & 1) compress_permutations[mask][n++] = lane;
        while (n < 8) compress_permutations[mask][n++] = 0;
    }
}
static inline int compress8(float *values_out, int32_t *positions_out, __m256 values,
                            __m256i positions, int mask) {
    const __m256i permutation = _mm256_loadu_si256((const __m256i *)compress_permutations[mask]);
    _mm256_storeu_ps(values_out, _mm256_permutevar8x32_ps(values, permutation));
    _mm256_storeu_si256((__m256i *)positions_out, _mm256_permutevar8x32_epi32(positions, permutation));
    return __builtin_popcount(mask);
}
#endif

static inline void prefetch_span(const float *start, int64_t n_floats) {
    const char *bytes = (const char *)start;
    for (int64_t b = 0; b < n_floats * (int64_t)sizeof(float); b += 64) __builtin_prefetch(bytes + b);
}

/* The thread team: torch's OpenMP runtime when Python hands over its GOMP_parallel (see
 * native.py), else threads started per call. After a parallel region OpenMP's threads spin
 * for a while before they sleep; started threads would compete with them for the cores,
 * where a GOMP_parallel region runs on them. */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
static gomp_parallel_fn gomp_parallel = NULL;

void mlsae_use_openmp(void *parallel) { gomp_parallel = (gomp_parallel_fn)parallel; }

typedef struct {
    void *(*fn)(void *);
    char *jobs;
    size_t job_size;
    int n_jobs, next;
} team_t;

/* Each member of the team takes jobs until none is left (a team may have fewer threads
 * than asked, when nested in another parallel region). */
static void team_member(void *arg) {
    team_t *team = arg;
    for (;;) {
        int job = __atomic_fetch_add(&team->next, 1, __ATOMIC_RELAXED);
        if (job >= team->n_jobs) return;
        team->fn(team->jobs + job * team->job_size);
    }
}

/* Runs fn on jobs[0 .. n_jobs), in parallel. */
static void run_jobs(void *(*fn)(void *), char *jobs, size_t job_size, int n_jobs) {
    if (n_jobs > 1 && gomp_parallel) {
        team_t team = {fn, jobs, job_size, n_jobs, 0};
        gomp_parallel(team_member, &team, (unsigned)n_jobs, 0);
        return;
    }
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < n_jobs; t++) started[t] = pthread_create(&threads[t], NULL, fn, jobs + t * job_size) == 0;
    fn(jobs);
    for (int t = 1; t < n_jobs; t++) {
        if (started[t])
            pthread_join(threads[t], NULL);
        else
            fn(jobs + t * job_size);
    }
}

static int clamp_threads(int n_threads) {
    return n_threads < 1 ? 1 : n_threads > MAX_THREADS ? MAX_THREADS : n_threads;
}

/* ---- topk: the k largest elements of every row, unsorted ----
 *
 * A row is scanned 16 elements at a time against a threshold, the smallest of a buffer
 * that holds the k largest elements seen so far: elements above it are appended to the
 * buffer, and a buffer of 2k elements is cut back to its k largest (quickselect), which
 * raises the threshold. On random rows only about k * ln(n / k) elements pass, so the
 * cost is one vectorised comparison per element. Rows holding a NaN are flagged instead
 * (torch.topk ranks NaN above everything; the caller runs it on those rows). Among tied
 * elements at the k-th value, which indices are kept is unspecified, as in torch.topk. */

typedef struct {
    int64_t row_start, row_stop, n, k, row_stride;
    const float *x;
    float *values;
    int64_t *indices;
    uint8_t *nan_rows;
    int status;
} topk_job;

static inline void swap_entries(float *v, int32_t *ix, int64_t a, int64_t b) {
    float tv = v[a];
    v[a] = v[b];
    v[b] = tv;
    int32_t ti = ix[a];
    ix[a] = ix[b];
    ix[b] = ti;
}

/* Reorders v[0..m) (with ix) so that v[0..k) are its k largest: quickselect. */
static void select_scalar(float *v, int32_t *ix, int64_t m, int64_t k) {
    int64_t lo = 0, hi = m - 1;
    while (lo < hi) {
        float a = v[lo], b = v[lo + (hi - lo) / 2], c = v[hi];
        float pivot = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) swap_entries(v, ix, i++, j--);
        }
        if (k - 1 <= j)
            hi = j;
        else if (k - 1 >= i)
            lo = i;
        else
            break;
    }
}

/* Scratch for keep_largest: three arrays of values and positions, each of capacity cap. */
typedef struct {
    float *values;
    int32_t *positions;
    int64_t cap;
} scratch_t;

#if defined(__AVX512F__) || defined(__AVX2__)
/* Splits cv[0..cm) (with ci) three ways around pivot, keeping the order: into the scratch's
 * arrays of entries above, equal to and below it, whose counts it writes to counts[0..3).
 * Each block of 16 (AVX-512) or 8 (AVX2) entries goes by compress-stores, without branches. */
static void split_around(const float *cv, const int32_t *ci, int64_t cm, float pivot,
                         const scratch_t *scratch, int64_t counts[3]) {
    float *out_v[3] = {scratch->values, scratch->values + scratch->cap, scratch->values + 2 * scratch->cap};
    int32_t *out_i[3] = {scratch->positions, scratch->positions + scratch->cap,
                         scratch->positions + 2 * scratch->cap};
    int64_t n[3] = {0, 0, 0}, j = 0;
#if defined(__AVX512F__)
    const __m512 pv = _mm512_set1_ps(pivot);
    for (; j < cm; j += 16) {
        const __mmask16 valid = cm - j >= 16 ? 0xFFFF : (__mmask16)((1u << (cm - j)) - 1);
        const __m512 x = _mm512_maskz_loadu_ps(valid, cv + j);
        const __m512i p = _mm512_maskz_loadu_epi32(valid, ci + j);
        const __mmask16 above = _mm512_mask_cmp_ps_mask(valid, x, pv, _CMP_GT_OQ);
        const __mmask16 equal = _mm512_mask_cmp_ps_mask(valid, x, pv, _CMP_EQ_OQ);
        const __mmask16 masks[3] = {above, equal, valid & ~above & ~equal};
        for (int s = 0; s < 3; s++) {
            _mm512_mask_compressstoreu_ps(out_v[s] + n[s], masks[s], x);
            _mm512_mask_compressstoreu_epi32(out_i[s] + n[s], masks[s], p);
            n[s] += __builtin_popcount(masks[s]);
        }
    }
#else
    const __m256 pv = _mm256_set1_ps(pivot);
    for (; j + 8 <= cm; j += 8) {
        const __m256 x = _mm256_loadu_ps(cv + j);
        const __m256i p = _mm256_loadu_si256((const __m256i *)(ci + j));
        const int above = _mm256_movemask_ps(_mm256_cmp_ps(x, pv, _CMP_GT_OQ));
        const int equal = _mm256_movemask_ps(_mm256_cmp_ps(x, pv, _CMP_EQ_OQ));
        const int masks[3] = {above, equal, 0xFF & ~above & ~equal};
        for (int s = 0; s < 3; s++) n[s] += compress8(out_v[s] + n[s], out_i[s] + n[s], x, p, masks[s]);
    }
    for (; j < cm; j++) {
        const int s = cv[j] > pivot ? 0 : cv[j] == pivot ? 1 : 2;
        out_v[s][n[s]] = cv[j];
        out_i[s][n[s]++] = ci[j];
    }
#endif
    for (int s = 0; s < 3; s++) counts[s] = n[s];
}
#endif

/* Reorders v[0..m) (with ix) so that v[0..k) are its k largest. With AVX-512 or AVX2 a
 * quickselect whose partitions split three ways by compress-stores (split_around). */
static void keep_largest(float *v, int32_t *ix, int64_t m, int64_t k, const scratch_t *scratch) {
#if defined(__AVX512F__) || defined(__AVX2__)
    int64_t start = 0, need = k;
    while (m - start > 64) {
        float *cv = v + start;
        int32_t *ci = ix + start;
        const int64_t cm = m - start;
        float a = cv[0], b = cv[cm / 2], c = cv[cm - 1];
        const float pivot = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
        if (pivot != pivot) break; /* NaN: left to the scalar quickselect */
        int64_t n[3];
        split_around(cv, ci, cm, pivot, scratch, n);
        int64_t offset = 0;
        for (int s = 0; s < 3; s++) {
            memcpy(cv + offset, scratch->values + s * scratch->cap, n[s] * sizeof(float));
            memcpy(ci + offset, scratch->positions + s * scratch->cap, n[s] * sizeof(int32_t));
            offset += n[s];
        }
        if (need <= n[0]) {
            m = start + n[0];
        } else if (need <= n[0] + n[1]) {
            return;
        } else {
            start += n[0] + n[1];
            need -= n[0] + n[1];
        }
    }
    if (need < m - start) select_scalar(v + start, ix + start, m - start, need);
#else
    (void)scratch;
    select_scalar(v, ix, m, k);
#endif
}

static float smallest(const float *v, int64_t m) {
    float least = v[0];
    for (int64_t i = 1; i < m; i++) least = v[i] < least ? v[i] : least;
    return least;
}

#if !defined(__AVX512F__)
/* Whether any of p[0..16) is above t or NaN. */
static inline int any_above(const float *p, float t) {
#if defined(__AVX__)
    __m256 tv = _mm256_set1_ps(t);
    __m256 a = _mm256_cmp_ps(_mm256_loadu_ps(p), tv, _CMP_NLE_UQ);
    __m256 b = _mm256_cmp_ps(_mm256_loadu_ps(p + 8), tv, _CMP_NLE_UQ);
    return _mm256_movemask_ps(_mm256_or_ps(a, b)) != 0;
#else
    int above = 0;
    for (int u = 0; u < 16; u++) above |= !(p[u] <= t);
    return above;
#endif
}
#endif

/* Cuts the m >= 2k candidates in the buffer back to their k largest; returns the new
 * threshold, the smallest of them. */
static inline float cut_to_k(float *buffer, int32_t *positions, int64_t *m, int64_t k,
                             const scratch_t *scratch) {
    keep_largest(buffer, positions, *m, k, scratch);
    *m = k;
    return smallest(buffer, k);
}

/* Appends row[start..n) elements above *threshold to the buffer (m entries so far),
 * cutting it back to its k largest whenever it holds 2k or more, which raises *threshold.
 * The buffer has room for 2k + 16 entries. Returns the new m, or -1 when the row holds a
 * NaN. With AVX-512, each block of 16 is compared and its passing elements appended by
 * one compress-store, without branches; with AVX2, the same by 8 with compress8 (the
 * buffer's 16 spare entries take its full stores). */
static int64_t scan_row(const float *row, int64_t start, int64_t n, int64_t k, float *threshold,
                        float *buffer, int32_t *positions, int64_t m, const scratch_t *scratch) {
    float t = *threshold;
#if defined(__AVX512F__)
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 tv = _mm512_set1_ps(t);
    for (int64_t j = start; j < n; j += 16) {
        const __mmask16 valid = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(valid, row + j);
        const __mmask16 above = _mm512_mask_cmp_ps_mask(valid, v, tv, _CMP_NLE_UQ);
        if (__builtin_expect(!above, 1)) continue;
        if (_mm512_mask_cmp_ps_mask(above, v, v, _CMP_UNORD_Q)) return -1;
        const __m512i index = _mm512_add_epi32(_mm512_set1_epi32((int32_t)j), lanes);
        _mm512_mask_compressstoreu_ps(buffer + m, above, v);
        _mm512_mask_compressstoreu_epi32(positions + m, above, index);
        m += __builtin_popcount(above);
        if (m >= 2 * k) {
            t = cut_to_k(buffer, positions, &m, k, scratch);
            tv = _mm512_set1_ps(t);
        }
    }
#else
#if defined(__AVX2__)
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 tv = _mm256_set1_ps(t);
    for (; start + 16 <= n; start += 16) {
        if (__builtin_expect(!any_above(row + start, t), 1)) continue;
        for (int64_t j = start; j < start + 16; j += 8) {
            const __m256 v = _mm256_loadu_ps(row + j);
            const int above = _mm256_movemask_ps(_mm256_cmp_ps(v, tv, _CMP_NLE_UQ));
            if (!above) continue;
            if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) return -1;
            const __m256i index = _mm256_add_epi32(_mm256_set1_epi32((int32_t)j), lanes);
            m += compress8(buffer + m, positions + m, v, index, above);
            if (m >= 2 * k) {
                t = cut_to_k(buffer, positions, &m, k, scratch);
                tv = _mm256_set1_ps(t);
            }
        }
    }
#endif
    for (int64_t j = start; j < n; j += 16) {
        const int64_t stop = j + 16 < n ? j + 16 : n;
        if (stop - j == 16 && __builtin_expect(!any_above(row + j, t), 1)) continue;
        for (int64_t i = j; i < stop; i++) {
            const float value = row[i];
            if (value <= t) continue;
            if (value != value) return -1;
            buffer[m] = value;
            positions[m++] = (int32_t)i;
            if (m >= 2 * k) t = cut_to_k(buffer, positions, &m, k, scratch);
        }
    }
#endif
    *threshold = t;
    return m;
}

/* A threshold with at least k elements of the row at or above it: the k-th largest of
 * the maxima of `groups` interleaved groups of elements (groups >= k, a multiple of 16). */
static float group_threshold(const float *row, int64_t n, int64_t k, int64_t groups, float *maxima,
                             int32_t *positions, const scratch_t *scratch) {
    for (int64_t g = 0; g < groups; g++) maxima[g] = row[g];
    const int64_t full = n / groups * groups;
    for (int64_t j = groups; j < full; j += groups)
        for (int64_t g = 0; g < groups; g++) maxima[g] = row[j + g] > maxima[g] ? row[j + g] : maxima[g];
    keep_largest(maxima, positions, groups, k, scratch);
    return smallest(maxima, k);
}

static void *topk_worker(void *arg) {
    topk_job *job = arg;
    const int64_t n = job->n, k = job->k, groups = (k + 15) / 16 * 16;
    const int use_groups = n >= 8 * groups;
    const int64_t cap = 2 * k + 16 + groups;
    float *buffer = malloc(cap * sizeof(float));
    int32_t *positions = malloc(cap * sizeof(int32_t));
    scratch_t scratch = {malloc(3 * cap * sizeof(float)), malloc(3 * cap * sizeof(int32_t)), cap};
    if (!buffer || !positions || !scratch.values || !scratch.positions) {
        job->status = 2;
        goto done;
    }
    for (int64_t r = job->row_start; r < job->row_stop; r++) {
        const float *row = job->x + r * job->row_stride;
        int64_t m = -2; /* -2: not scanned yet; -1: the row holds a NaN */
        float threshold;
        if (use_groups) {
            threshold = group_threshold(row, n, k, groups, buffer, positions, &scratch);
            if (threshold == threshold && threshold > -__builtin_inff()) {
                /* the largest float below the threshold: elements equal to it pass */
                threshold = __builtin_nextafterf(threshold, -__builtin_inff());
                m = scan_row(row, 0, n, k, &threshold, buffer, positions, 0, &scratch);
                if (m >= 0 && m < k) m = -2; /* cannot happen without NaN; start over */
            }
        }
        if (m == -2) {
            /* The first k elements, then the rest against the smallest of the buffer. */
            int has_nan = 0;
            for (m = 0; m < k; m++) {
                buffer[m] = row[m];
                positions[m] = (int32_t)m;
                has_nan |= row[m] != row[m];
            }
            threshold = smallest(buffer, k);
            m = has_nan ? -1 : scan_row(row, k, n, k, &threshold, buffer, positions, k, &scratch);
        }
        job->nan_rows[r] = m < 0;
        if (m < 0) continue;
        if (m > k) keep_largest(buffer, positions, m, k, &scratch);
        for (int64_t i = 0; i < k; i++) {
            job->values[r * k + i] = buffer[i];
            job->indices[r * k + i] = positions[i];
        }
    }
done:
    free(buffer);
    free(positions);
    free(scratch.values);
    free(scratch.positions);
    return NULL;
}

int mlsae_topk(int n_threads, int64_t n_rows, int64_t n, int64_t k, int64_t row_stride,
               const float *x, float *values, int64_t *indices, uint8_t *nan_rows) {
    n_threads = clamp_threads(n_threads);
    if (n_threads > n_rows) n_threads = n_rows > 0 ? (int)n_rows : 1;
    if (k < 1 || k > n || n > INT32_MAX) return 3;
    topk_job jobs[MAX_THREADS];
    for (int t = 0; t < n_threads; t++)
        jobs[t] = (topk_job){n_rows * t / n_threads, n_rows * (t + 1) / n_threads, n, k,
                             row_stride, x, values, indices, nan_rows, 0};
    run_jobs(topk_worker, (char *)jobs, sizeof(topk_job), n_threads);
    int status = 0;
    for (int t = 0; t < n_threads; t++) status = status > jobs[t].status ? status : jobs[t].status;
    return status;
}

/* ---- sparse_backward: the fused autoencoder's backward over its selected entries ----
 *
 * Entry (v, i) of the [n_vectors, width] selection has latent selected[v, i] and value
 * values[v, i]; slots i < k were decoded into row v of the decoded output, the others
 * (AuxK's) into row v of the AuxK output, whose gradients are grad_main and grad_aux. With
 * skip_nonpositive (values after ReLU), entries whose value is not positive are skipped:
 * ReLU zeroed them (or they are NaN). For every other entry:
 *
 *   dvals[v, i]     = dot(grad row, decoder[latent]) + direct[v, i] (direct may be NULL)
 *   grad_dec[l]    += value * grad row          (latent-major, like decoder)
 *   grad_enc[l]    += dvals[v, i] * x[v]
 *   latent_sums[l] += dvals[v, i]
 *
 * dvals is written in full (zero where skipped); grad_enc and latent_sums may be NULL.
 * Threads own blocks of latents in turn (OWN_BLOCK). The vectors are
 * visited in tiles small enough that their rows of grad_main, grad_aux and x stay in the
 * L2 cache; within a tile, a counting sort orders the thread's entries by latent, so a
 * latent's decoder row and gradient rows are loaded once per tile. Sums run in vector
 * order whatever the tile and thread count. */

typedef struct {
    int thread, n_threads, skip_nonpositive;
    int64_t n_vectors, width, k, n_latents, d, decoder_stride, tile;
    const int64_t *selected;
    const float *values, *direct, *grad_main, *grad_aux, *decoder, *x;
    float *dvals, *grad_dec, *grad_enc, *latent_sums;
    int status;
} backward_job;

static inline int kept(const backward_job *job, float value) {
    return !job->skip_nonpositive || value > 0;
}

#define CHUNK_ENTRIES 256
#define BWD_BLOCK 4 /* vector registers per column block: 64 columns with AVX-512 */

/* Up to CHUNK_ENTRIES entries of one latent in one tile: their rows of the gradient and of
 * x, their values and direct gradients; backward_chunk fills in their dvals. */
typedef struct {
    const float *grad[CHUNK_ENTRIES], *x[CHUNK_ENTRIES];
    float value[CHUNK_ENTRIES], direct[CHUNK_ENTRIES], dval[CHUNK_ENTRIES];
    vec partial[CHUNK_ENTRIES];
} chunk_t;

static void backward_chunk(chunk_t *c, int n, int64_t d, const float *decoder_row, float *dec_out,
                           float *enc_out, int accumulate) {
    const int64_t blocked = d / (VEC_FLOATS * BWD_BLOCK) * (VEC_FLOATS * BWD_BLOCK);
    for (int e = 0; e < n; e++) c->partial[e] = (vec){0};
    for (int64_t col = 0; col < blocked; col += VEC_FLOATS * BWD_BLOCK) {
        vec w[BWD_BLOCK], acc[BWD_BLOCK];
        for (int u = 0; u < BWD_BLOCK; u++) {
            w[u] = load_vec(decoder_row + col + VEC_FLOATS * u);
            acc[u] = accumulate ? load_vec(dec_out + col + VEC_FLOATS * u) : (vec){0};
        }
        for (int e = 0; e < n; e++) {
            const float *g = c->grad[e] + col;
            const vec value = broadcast(c->value[e]);
            vec part = c->partial[e];
            for (int u = 0; u < BWD_BLOCK; u++) {
                vec gu = load_vec(g + VEC_FLOATS * u);
                part += gu * w[u];
                acc[u] += value * gu;
            }
            c->partial[e] = part;
        }
        for (int u = 0; u < BWD_BLOCK; u++) store_vec(dec_out + col + VEC_FLOATS * u, acc[u]);
    }
    for (int e = 0; e < n; e++) {
        float dval = 0;
        for (int u = 0; u < VEC_FLOATS; u++) dval += c->partial[e][u];
        for (int64_t j = blocked; j < d; j++) dval = __builtin_fmaf(c->grad[e][j], decoder_row[j], dval);
        c->dval[e] = dval + c->direct[e];
    }
    for (int64_t j = blocked; j < d; j++) {
        float acc = accumulate ? dec_out[j] : 0;
        for (int e = 0; e < n; e++) acc = __builtin_fmaf(c->value[e], c->grad[e][j], acc);
        dec_out[j] = acc;
    }
    if (!enc_out) return;
    for (int64_t col = 0; col < blocked; col += VEC_FLOATS * BWD_BLOCK) {
        vec acc[BWD_BLOCK];
        for (int u = 0; u < BWD_BLOCK; u++)
            acc[u] = accumulate ? load_vec(enc_out + col + VEC_FLOATS * u) : (vec){0};
        for (int e = 0; e < n; e++) {
            const vec dval = broadcast(c->dval[e]);
            for (int u = 0; u < BWD_BLOCK; u++) acc[u] += dval * load_vec(c->x[e] + col + VEC_FLOATS * u);
        }
        for (int u = 0; u < BWD_BLOCK; u++) store_vec(enc_out + col + VEC_FLOATS * u, acc[u]);
    }
    for (int64_t j = blocked; j < d; j++) {
        float acc = accumulate ? enc_out[j] : 0;
        for (int e = 0; e < n; e++) acc = __builtin_fmaf(c->dval[e], c->x[e][j], acc);
        enc_out[j] = acc;
    }
}

/* Threads own the latents in blocks of OWN_BLOCK, taking turns: each thread's rows of the
 * decoder and of its gradients come in sequential runs that the hardware prefetches. */
#define OWN_BLOCK 64
static inline int64_t owner(int64_t latent, int64_t nt) { return latent / OWN_BLOCK % nt; }
static inline int64_t local(int64_t latent, int64_t nt) {
    return latent / OWN_BLOCK / nt * OWN_BLOCK + latent % OWN_BLOCK;
}
static inline int64_t global(int64_t local_index, int64_t thread, int64_t nt) {
    return (local_index / OWN_BLOCK * nt + thread) * OWN_BLOCK + local_index % OWN_BLOCK;
}

static void *backward_worker(void *arg) {
    backward_job *job = arg;
    const int64_t d = job->d, width = job->width, nt = job->n_threads;
    const int64_t n_own = ((job->n_latents + OWN_BLOCK - 1) / OWN_BLOCK + nt - 1) / nt * OWN_BLOCK;
    int64_t *ends = calloc(n_own + 1, sizeof(int64_t));
    int32_t *entries = malloc(job->tile * width * sizeof(int32_t));
    uint8_t *touched = calloc(n_own > 0 ? n_own : 1, 1);
    chunk_t *chunk = aligned_alloc(64, sizeof(chunk_t));
    if (!ends || !entries || !touched || !chunk) {
        job->status = 2;
        goto done;
    }
    for (int64_t v0 = 0; v0 < job->n_vectors; v0 += job->tile) {
        const int64_t v1 = v0 + job->tile < job->n_vectors ? v0 + job->tile : job->n_vectors;
        const int64_t base = v0 * width, n_positions = (v1 - v0) * width;
        const int64_t *selected = job->selected + base;
        const float *values = job->values + base;
        /* Counting sort of this tile's own entries by latent: ends[l + 1] counts, then
         * offsets, then (after the scatter) ends. */
        memset(ends, 0, (n_own + 1) * sizeof(int64_t));
        for (int64_t p = 0; p < n_positions; p++) {
            int64_t latent = selected[p];
            if ((uint64_t)latent >= (uint64_t)job->n_latents) {
                job->status = 1;
                goto done;
            }
            if (owner(latent, nt) == job->thread && kept(job, values[p])) ends[local(latent, nt) + 1]++;
        }
        for (int64_t l = 0; l < n_own; l++) ends[l + 1] += ends[l];
        for (int64_t p = 0; p < n_positions; p++) {
            int64_t latent = selected[p];
            if (owner(latent, nt) == job->thread && kept(job, values[p]))
                entries[ends[local(latent, nt)]++] = (int32_t)p;
        }
        int64_t start = 0;
        for (int64_t l = 0; l < n_own; l++) {
            const int64_t stop = ends[l];
            if (stop == start) continue;
            const int64_t latent = global(l, job->thread, nt);
            const float *decoder_row = job->decoder + latent * job->decoder_stride;
            float *dec_out = job->grad_dec + latent * d;
            float *enc_out = job->grad_enc ? job->grad_enc + latent * d : NULL;
            float latent_sum = job->latent_sums && touched[l] ? job->latent_sums[latent] : 0;
            for (int64_t first = start; first < stop; first += CHUNK_ENTRIES) {
                int n = stop - first < CHUNK_ENTRIES ? (int)(stop - first) : CHUNK_ENTRIES;
                for (int e = 0; e < n; e++) {
                    const int64_t p = entries[first + e], v = v0 + p / width;
                    chunk->grad[e] = (p % width < job->k ? job->grad_main : job->grad_aux) + v * d;
                    chunk->x[e] = enc_out ? job->x + v * d : NULL;
                    chunk->value[e] = values[p];
                    chunk->direct[e] = job->direct ? job->direct[base + p] : 0;
                    prefetch_span(chunk->grad[e], d);
                    if (enc_out) prefetch_span(chunk->x[e], d);
                }
                backward_chunk(chunk, n, d, decoder_row, dec_out, enc_out, touched[l] || first > start);
                for (int e = 0; e < n; e++) {
                    job->dvals[base + entries[first + e]] = chunk->dval[e];
                    latent_sum += chunk->dval[e];
                }
            }
            if (job->latent_sums) job->latent_sums[latent] = latent_sum;
            touched[l] = 1;
            start = stop;
        }
    }
    for (int64_t l = 0; l < n_own; l++) {
        const int64_t latent = global(l, job->thread, nt);
        if (touched[l] || latent >= job->n_latents) continue;
        memset(job->grad_dec + latent * d, 0, d * sizeof(float));
        if (job->grad_enc) memset(job->grad_enc + latent * d, 0, d * sizeof(float));
        if (job->latent_sums) job->latent_sums[latent] = 0;
    }
done:
    free(ends);
    free(entries);
    free(touched);
    free(chunk);
    return NULL;
}

int mlsae_sparse_backward(int n_threads, int skip_nonpositive, int64_t n_vectors, int64_t width, int64_t k,
                          int64_t n_latents, int64_t d, int64_t decoder_stride, int64_t tile,
                          const int64_t *selected, const float *values, const float *direct,
                          const float *grad_main, const float *grad_aux, const float *decoder,
                          const float *x, float *dvals, float *grad_dec, float *grad_enc,
                          float *latent_sums) {
    n_threads = clamp_threads(n_threads);
    if (n_threads > n_latents) n_threads = n_latents > 0 ? (int)n_latents : 1;
    if (tile < 1) tile = 1;
    memset(dvals, 0, n_vectors * width * sizeof(float));
    backward_job jobs[MAX_THREADS];
    for (int t = 0; t < n_threads; t++)
        jobs[t] = (backward_job){t, n_threads, skip_nonpositive, n_vectors, width, k, n_latents, d, decoder_stride,
                                 tile, selected, values, direct, grad_main, grad_aux, decoder, x,
                                 dvals, grad_dec, grad_enc, latent_sums, 0};
    run_jobs(backward_worker, (char *)jobs, sizeof(backward_job), n_threads);
    int status = 0;
    for (int t = 0; t < n_threads; t++) status = status > jobs[t].status ? status : jobs[t].status;
    return status;
}
