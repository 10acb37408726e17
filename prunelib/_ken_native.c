/*
 * KEN's per-row selection (prunelib.methods.ken.kde_select_rows) compiled: one row at a time,
 * everything in cache, no Python or torch in the loop.
 *
 * The steps and their arithmetic are those of the torch path in ken.py (same grid, same
 * bandwidth rule, same greedy matching and tie rules), so both give the same positions; the
 * densities agree to rounding error (a density within ~1e-13 of a .5 boundary may round the
 * other way, as it may between any two exact evaluations).
 *
 * Densities: the Gaussian KDE at a uniform grid via the recurrence
 *   exp(-(u_j - v)^2) = exp(-u_j^2) * exp(2 u_0 v - v^2) * exp(2 du v)^(j)
 * (u, v in units of h*sqrt(2), centred on a segment of the grid). The grid is cut into
 * segments narrow enough that no factor of a value that matters under- or overflows; values
 * farther than D = 7 (contribution < exp(-49)) from a segment are left out of it.
 *
 * Built at install time by setup.py (optional: without it ken.py uses the torch path).
 * Python API: select(src, is_double, n_rows, n, k, out_mask, out_dens) with addresses of
 * contiguous buffers: src [n_rows, n] float32 or float64, out_mask [n_rows, n] bytes (0/1),
 * out_dens [n_rows, k] float64 rounded densities in grid order (0 = not wanted).
 * The GIL is released while it runs, so Python threads can split the rows.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define HAVE_MXCSR 1
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* One build serves every x86-64 CPU: the loader picks the widest variant the CPU has. */
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

#define LANES 8
typedef double v8d __attribute__((vector_size(LANES * sizeof(double))));

static const double SQRT_2PI = 2.5066282746310002; /* sqrt(2 pi), as math.sqrt(2.0 * math.pi) */
static const double WINDOW = 7.0;       /* values farther than this (scaled) from a segment are left out */
/* Scaled width of a segment (2 w): the smallest factor, exp(-(2 w + D)^2 + w^2), stays above
 * 1e-300 for w = 10.5. Grid steps above MAX_STEP make one-point segments, so the ratio
 * exp(2 du v) stays below exp(350). */
static const double SEGMENT_WIDTH = 21.0;
static const double MAX_STEP = 10.0;

typedef struct {
    int64_t n, k;
    uint64_t *keys, *keys_tmp;
    int32_t *idx, *idx_tmp;
    double *x;            /* the row in float64 */
    double *vals;         /* [-inf, sorted row, +inf] */
    int32_t *origin;      /* original index of each sorted position (n for the sentinels) */
    int32_t *run_start, *right, *left;
    uint8_t *taken;
    double *grid, *dens, *prio;
    double *term, *ratio, *sums;
    v8d *acc;
    int32_t *order;
} workspace;

static void free_ws(workspace *w) {
    free(w->keys); free(w->keys_tmp); free(w->idx); free(w->idx_tmp); free(w->x); free(w->vals);
    free(w->origin); free(w->run_start); free(w->right); free(w->left); free(w->taken); free(w->grid);
    free(w->dens); free(w->prio); free(w->term); free(w->ratio); free(w->sums); free(w->acc); free(w->order);
}

static int alloc_ws(workspace *w, int64_t n, int64_t k) {
    int64_t m = n > k ? n : k;
    memset(w, 0, sizeof(*w));
    w->n = n; w->k = k;
    w->keys = malloc(m * sizeof(uint64_t)); w->keys_tmp = malloc(m * sizeof(uint64_t));
    w->idx = malloc(m * sizeof(int32_t)); w->idx_tmp = malloc(m * sizeof(int32_t));
    w->x = malloc(n * sizeof(double));
    w->vals = malloc((n + 2) * sizeof(double));
    w->origin = malloc((n + 2) * sizeof(int32_t));
    w->run_start = malloc((n + 2) * sizeof(int32_t));
    w->right = malloc((n + 2) * sizeof(int32_t));
    w->left = malloc((n + 2) * sizeof(int32_t));
    w->taken = malloc(n + 2);
    w->grid = malloc(k * sizeof(double)); w->dens = malloc(k * sizeof(double));
    w->prio = malloc(k * sizeof(double)); w->sums = malloc(k * sizeof(double));
    w->term = malloc((n + 2 * LANES) * sizeof(double)); w->ratio = malloc((n + 2 * LANES) * sizeof(double));
    w->acc = aligned_alloc(64, ((k * sizeof(v8d) + 63) / 64) * 64);
    w->order = malloc(k * sizeof(int32_t));
    if (!w->keys || !w->keys_tmp || !w->idx || !w->idx_tmp || !w->x || !w->vals || !w->origin || !w->run_start
        || !w->right || !w->left || !w->taken || !w->grid || !w->dens || !w->prio || !w->sums || !w->term
        || !w->ratio || !w->acc || !w->order) {
        free_ws(w);
        return -1;
    }
    return 0;
}

/* Order-preserving map of a finite double to an unsigned key. */
static inline uint64_t sortable(double d) {
    uint64_t u;
    memcpy(&u, &d, sizeof(u));
    return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}

/* Stable LSD radix sort of keys[0..m) carrying idx; passes whose byte never varies are skipped. */
static void radix_sort(uint64_t *keys, int32_t *idx, uint64_t *keys_tmp, int32_t *idx_tmp, int64_t m) {
    static const int BYTES = 8;
    int64_t count[8][256];
    memset(count, 0, sizeof(count));
    for (int64_t i = 0; i < m; i++) {
        uint64_t key = keys[i];
        for (int b = 0; b < BYTES; b++) count[b][(key >> (8 * b)) & 0xff]++;
    }
    uint64_t *src_k = keys, *dst_k = keys_tmp;
    int32_t *src_i = idx, *dst_i = idx_tmp;
    for (int b = 0; b < BYTES; b++) {
        int64_t *c = count[b];
        int constant = 0;
        for (int v = 0; v < 256; v++) {
            if (c[v] == m) { constant = 1; break; }
            if (c[v]) break;
        }
        if (constant) continue;
        int64_t pos = 0;
        for (int v = 0; v < 256; v++) { int64_t t = c[v]; c[v] = pos; pos += t; }
        for (int64_t i = 0; i < m; i++) {
            int64_t p = c[(src_k[i] >> (8 * b)) & 0xff]++;
            dst_k[p] = src_k[i];
            dst_i[p] = src_i[i];
        }
        uint64_t *tk = src_k; src_k = dst_k; dst_k = tk;
        int32_t *ti = src_i; src_i = dst_i; dst_i = ti;
    }
    if (src_k != keys) {
        memcpy(keys, src_k, m * sizeof(uint64_t));
        memcpy(idx, src_i, m * sizeof(int32_t));
    }
}

/* sums[j] = sum_i term[i] * ratio[i]^j for j < kk (m values, padded buffers). */
MULTIVERSION
static void power_sums(double *term, double *ratio, int64_t m, int64_t kk, v8d *acc, double *sums) {
    memset(acc, 0, kk * sizeof(v8d));
    for (int64_t l = 0; l < 2 * LANES; l++) { term[m + l] = 0.0; ratio[m + l] = 0.0; }
    for (int64_t i = 0; i < m; i += 2 * LANES) {
        v8d t1, r1, t2, r2;
        memcpy(&t1, term + i, sizeof(v8d)); memcpy(&r1, ratio + i, sizeof(v8d));
        memcpy(&t2, term + i + LANES, sizeof(v8d)); memcpy(&r2, ratio + i + LANES, sizeof(v8d));
        for (int64_t j = 0; j < kk; j++) {
            acc[j] += t1 + t2;
            t1 *= r1;
            t2 *= r2;
        }
    }
    for (int64_t j = 0; j < kk; j++) {
        v8d a = acc[j];
        sums[j] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    }
}

static int64_t lower_bound(const double *a, int64_t lo, int64_t hi, double v) { /* first i in [lo, hi) with a[i] >= v */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (a[mid] < v) lo = mid + 1; else hi = mid;
    }
    return lo;
}

static int64_t upper_bound(const double *a, int64_t lo, int64_t hi, double v) { /* first i in [lo, hi) with a[i] > v */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (a[mid] <= v) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* Rounded Gaussian KDE of the sorted row sv[0..n) at w->grid, into w->dens (grid order). */
static void densities(workspace *w, const double *sv) {
    const int64_t n = w->n, k = w->k;
    const double *g = w->grid;
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < n; i++) mean += w->x[i];
    mean /= (double)n;
    for (int64_t i = 0; i < n; i++) { double d = w->x[i] - mean; var += d * d; }
    double sd = sqrt(var / (double)n);
    double h = fabs(1.06 * sd * pow((double)n, -0.2));
    if (!(h > 0.0)) {
        for (int64_t j = 0; j < k; j++) w->dens[j] = 0.0;
        return;
    }
    const double norm = 1.0 / ((double)n * h * SQRT_2PI);
    const double scale = 1.0 / (h * sqrt(2.0));
    int64_t j0 = 0;
    while (j0 < k) {
        int64_t j1 = j0 + 1; /* the segment is grid points [j0, j1) */
        while (j1 < k && (g[j1] - g[j0]) * scale <= SEGMENT_WIDTH && (g[j0 + 1] - g[j0]) * scale <= MAX_STEP) j1++;
        const double centre = (g[j0] + g[j1 - 1]) / 2;
        const double u0 = (g[j0] - centre) * scale;
        const double du = j1 - j0 > 1 ? (g[j0 + 1] - centre) * scale - u0 : 0.0;
        const double half = (g[j1 - 1] - g[j0]) / 2 * scale;
        const double reach = (half + WINDOW) / scale;
        const int64_t a = lower_bound(sv, 0, n, centre - reach), b = upper_bound(sv, a, n, centre + reach);
        const int64_t m = b - a;
        for (int64_t i = 0; i < m; i++) {
            const double v = (sv[a + i] - centre) * scale;
            w->term[i] = exp(2.0 * u0 * v - v * v);
            w->ratio[i] = exp(2.0 * du * v);
        }
        power_sums(w->term, w->ratio, m, j1 - j0, w->acc, w->sums);
        for (int64_t j = j0; j < j1; j++) {
            const double u = (g[j] - centre) * scale;
            w->dens[j] = nearbyint(w->sums[j - j0] * exp(-u * u) * norm); /* half to even */
        }
        j0 = j1;
    }
}

static inline int32_t find(int32_t *parent, int32_t i) { /* root with path halving */
    while (parent[i] != i) {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    return i;
}

static void select_row(workspace *w, const void *src, int is_double, uint8_t *out_mask, double *out_dens) {
    const int64_t n = w->n, k = w->k;
    for (int64_t i = 0; i < n; i++) {
        /* + 0.0 turns -0.0 into 0.0: equal values must sort by index, as a stable sort keeps them */
        double v = (is_double ? ((const double *)src)[i] : (double)((const float *)src)[i]) + 0.0;
        w->x[i] = v;
        w->keys[i] = sortable(v);
        w->idx[i] = (int32_t)i;
    }
    radix_sort(w->keys, w->idx, w->keys_tmp, w->idx_tmp, n);
    double *vals = w->vals;
    int32_t *origin = w->origin;
    const int64_t width = n + 2;
    vals[0] = -INFINITY; vals[n + 1] = INFINITY;
    origin[0] = (int32_t)n; origin[n + 1] = (int32_t)n; /* sentinels lose index ties */
    for (int64_t p = 0; p < n; p++) { origin[p + 1] = w->idx[p]; vals[p + 1] = w->x[w->idx[p]]; }

    /* numpy.linspace(min, max, k) as ken._grid computes it */
    const double lo = vals[1], hi = vals[n];
    if (k == 1) {
        w->grid[0] = lo;
    } else {
        const double step = (hi - lo) / (double)(k - 1);
        for (int64_t j = 0; j < k; j++) w->grid[j] = (double)j * step + lo;
        w->grid[k - 1] = hi;
    }
    densities(w, vals + 1);
    if (out_dens) memcpy(out_dens, w->dens, k * sizeof(double));

    /* grid points by rounded density, descending, ties in grid order */
    for (int64_t j = 0; j < k; j++) { w->keys[j] = ~sortable(w->dens[j]); w->idx[j] = (int32_t)j; }
    radix_sort(w->keys, w->idx, w->keys_tmp, w->idx_tmp, k);

    int32_t *run_start = w->run_start, *right = w->right, *left = w->left;
    uint8_t *taken = w->taken;
    run_start[0] = 0;
    for (int64_t p = 0; p < width; p++) {
        right[p] = (int32_t)p; left[p] = (int32_t)p; taken[p] = 0;
        if (p) run_start[p] = vals[p] != vals[p - 1] ? (int32_t)p : run_start[p - 1];
    }
    for (int64_t t = 0; t < k; t++) {
        const double gv = w->grid[w->idx[t]];
        const int32_t pos = (int32_t)lower_bound(vals, 0, width, gv);
        const int32_t rc = find(right, pos);
        int32_t lc = find(left, pos - 1);
        lc = find(right, run_start[lc]); /* the smallest index among equal values on the left */
        const double dr = vals[rc] - gv, dl = gv - vals[lc];
        const int take_right = (dr < dl) || (dr == dl && origin[rc] < origin[lc]);
        const int32_t pick = take_right ? rc : lc;
        taken[pick] = 1;
        right[pick] = pick + 1;
        left[pick] = pick - 1;
    }
    for (int64_t p = 1; p <= n; p++) out_mask[origin[p]] = taken[p];
}

static PyObject *py_select(PyObject *self, PyObject *args) {
    unsigned long long src, out_mask, out_dens;
    int is_double;
    long long n_rows, n, k;
    if (!PyArg_ParseTuple(args, "KiLLLKK", &src, &is_double, &n_rows, &n, &k, &out_mask, &out_dens)) return NULL;
    if (n < 1 || k < 1 || k > n || n_rows < 0 || n > INT32_MAX - 2) {
        PyErr_Format(PyExc_ValueError, "select: need 1 <= k <= n < 2^31 - 2 and n_rows >= 0, got n_rows=%lld n=%lld k=%lld",
                     n_rows, n, k);
        return NULL;
    }
    workspace w;
    if (alloc_ws(&w, n, k)) return PyErr_NoMemory();
    const size_t elem = is_double ? sizeof(double) : sizeof(float);
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_MXCSR
    /* Flush denormals to zero: terms below 1e-308 of a density are noise, and denormal
     * arithmetic is ~100x slower. This thread's setting only, restored below. */
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
#endif
    for (long long r = 0; r < n_rows; r++) {
        select_row(&w, (const char *)(uintptr_t)src + (size_t)r * n * elem, is_double,
                   (uint8_t *)(uintptr_t)out_mask + (size_t)r * n,
                   out_dens ? (double *)(uintptr_t)out_dens + (size_t)r * k : NULL);
    }
#ifdef HAVE_MXCSR
    _mm_setcsr(csr);
#endif
    Py_END_ALLOW_THREADS
    free_ws(&w);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"select", py_select, METH_VARARGS,
     "select(src, is_double, n_rows, n, k, out_mask, out_dens): KEN's selection of k entries per row "
     "(buffer addresses; see prunelib.methods.ken)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ken_native", "KEN's per-row selection, compiled.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__ken_native(void) { return PyModule_Create(&module); }
