/*
 * The reference engine's prefill model (engine.h, kvfe_fit): a fixed cost, a per-token and an
 * attention term fitted per prompt-length class, as kvfabric.rates does for the Python engine
 * (docs/python.md, "Measured rates"; docs/connector.md, "Load or recompute"). One per-token rate
 * made a short pass's fixed cost a per-token cost of ten times the real one for a longer pass.
 */
#include "engine.h"

#include <math.h>
#include <string.h>

#define FIT_ALPHA     0.3   /* a class's newest pass, in its decayed mean */
#define FIT_HALF_LIFE 600.0 /* a class not measured for this long counts half */
#define FIT_MAX_COUNT 8     /* a class's weight grows with its passes up to this */
#define FIT_OUTLIER   3.0   /* a pass above this many times the prediction is taken at it */
#define FIT_X         1e-3  /* units: thousands of tokens */
#define FIT_Z         1e-6  /* millions of token-positions */

double kvfe_rates_compute_s(const kvfe_rates *r, size_t begin, size_t end)
{
    if (end <= begin)
        return r->base_s;
    double n = (double)(end - begin);
    return r->base_s + r->s_per_token * n + r->attn_s * n * ((double)begin + (double)end) / 2.0;
}

/* Gaussian elimination with partial pivoting on an n x n system (n <= 3): 0, or -1 where it is
 * singular. */
static int solve(int n, double m[3][4], double out[3])
{
    double scale = 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++)
            scale = fabs(m[i][j]) > scale ? fabs(m[i][j]) : scale;
    if (scale == 0)
        return -1;
    for (int c = 0; c < n; c++) {
        int p = c;
        for (int r = c + 1; r < n; r++)
            if (fabs(m[r][c]) > fabs(m[p][c]))
                p = r;
        if (fabs(m[p][c]) <= 1e-12 * scale)
            return -1;
        for (int k = 0; k <= n; k++) {
            double t = m[c][k];
            m[c][k] = m[p][k];
            m[p][k] = t;
        }
        for (int r = c + 1; r < n; r++) {
            double f = m[r][c] / m[c][c];
            for (int k = c; k <= n; k++)
                m[r][k] -= f * m[c][k];
        }
    }
    for (int r = n - 1; r >= 0; r--) {
        double v = m[r][n];
        for (int k = r + 1; k < n; k++)
            v -= m[r][k] * out[k];
        out[r] = v / m[r][r];
    }
    return 0;
}

/* The non-negative weighted least-squares fit over the classes: the first of (base, per token,
 * attention), (base, per token), (per token, attention), (per token) whose terms are all
 * non-negative. Relative error: each class weighted by its passes (up to FIT_MAX_COUNT), halved
 * every FIT_HALF_LIFE unmeasured, over its time squared. */
static void refit(const kvfe_fit *f, kvfe_rates *r, double now)
{
    static const int models[4][3] = {{0, 1, 2}, {0, 1, -1}, {1, 2, -1}, {1, -1, -1}};
    int classes = 0;
    for (int c = 0; c < KVFE_FIT_CLASSES; c++)
        classes += f->c[c].count > 0;
    double fit[3] = {0, 0, 0};
    int found = 0;
    for (int mi = 0; mi < 4 && !found; mi++) {
        int k = 0, terms[3];
        for (int j = 0; j < 3 && models[mi][j] >= 0; j++)
            terms[k++] = models[mi][j];
        if (classes < k)
            continue;
        double m[3][4] = {{0}};
        for (int c = 0; c < KVFE_FIT_CLASSES; c++) {
            const struct kvfe_fit_class *q = &f->c[c];
            if (q->count == 0)
                continue;
            double age = now > q->when ? now - q->when : 0;
            double w = q->count * pow(0.5, age / FIT_HALF_LIFE) / (q->y * q->y);
            double feat[3] = {1.0, q->x, q->z};
            for (int i = 0; i < k; i++) {
                for (int j = 0; j < k; j++)
                    m[i][j] += w * feat[terms[i]] * feat[terms[j]];
                m[i][k] += w * feat[terms[i]] * q->y;
            }
        }
        double sol[3];
        if (solve(k, m, sol) != 0)
            continue;
        int ok = 1, any = 0;
        for (int i = 0; i < k; i++) {
            ok &= sol[i] >= 0 && isfinite(sol[i]);
            any |= sol[i] > 0;
        }
        if (!ok || !any)
            continue;
        for (int i = 0; i < k; i++)
            fit[terms[i]] = sol[i];
        found = 1;
    }
    if (!found)
        return; /* the model stays as it was */
    r->base_s = fit[0];
    r->s_per_token = fit[1] * FIT_X;
    r->attn_s = fit[2] * FIT_Z;
}

void kvfe_fit_note(kvfe_fit *f, kvfe_rates *r, size_t new_tokens, size_t begin, double seconds,
                   double now)
{
    if (new_tokens == 0 || !(seconds >= 1e-9) || !isfinite(seconds))
        return; /* shorter is no measurement: the fit weighs by 1 / t^2 */
    int own = 0;
    for (int c = 0; c < KVFE_FIT_CLASSES; c++)
        own += f->c[c].count > 0;
    double want = kvfe_rates_compute_s(r, begin, begin + new_tokens);
    if (own >= 2 && want > 0 && seconds > FIT_OUTLIER * want) {
        seconds = FIT_OUTLIER * want;
        f->outliers++;
    }
    double n = (double)new_tokens;
    double x = n * FIT_X, z = n * ((double)begin + (double)begin + n) / 2.0 * FIT_Z;
    int c = 0;
    for (size_t v = new_tokens; v; v >>= 1)
        c++; /* the bit length: tokens in [2^(c-1), 2^c) */
    if (c >= KVFE_FIT_CLASSES)
        c = KVFE_FIT_CLASSES - 1;
    struct kvfe_fit_class *q = &f->c[c];
    if (q->count == 0) {
        q->x = x, q->z = z, q->y = seconds;
        q->count = 1;
    } else {
        q->x = (1 - FIT_ALPHA) * q->x + FIT_ALPHA * x;
        q->z = (1 - FIT_ALPHA) * q->z + FIT_ALPHA * z;
        q->y = (1 - FIT_ALPHA) * q->y + FIT_ALPHA * seconds;
        q->count += q->count < FIT_MAX_COUNT;
    }
    q->when = now;
    refit(f, r, now);
}

void kvfe_fit_clear(kvfe_fit *f)
{
    memset(f, 0, sizeof *f);
}
