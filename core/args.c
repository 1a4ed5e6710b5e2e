/*
 * The option parser of every kvfabric binary (args.h): a table of options read with getopt_long,
 * values checked by kind, errors naming the option, the usage printed from the same table.
 */
#include "args.h"

#include "kvf/kvf.h"
#include "log.h"
#include "units.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define VAL_HELP    'h'
#define VAL_VERSION 0x10000
#define VAL_FIRST   0x10001 /* table entry i has val VAL_FIRST + i */
#define USAGE_COL   30      /* where descriptions start */
#define USAGE_WIDTH 100

int kvf__args_next(int argc, char **argv, const char *shortopts, const struct option *opts,
                   const char **arg)
{
    /* '+': stop at the first argument that is not an option (no reordering, so a stray argument
     * is seen where it is); ':': a missing value is told apart from an unknown option. */
    char so[64];
    snprintf(so, sizeof so, "+:%s", shortopts ? shortopts : "");
    int at = optind > 0 ? optind : 1;
    opterr = 0;
    int c = getopt_long(argc, argv, so, opts, NULL);
    if (c == -1) {
        *arg = optind < argc ? argv[optind] : NULL;
        return 0;
    }
    if (c == '?' || c == ':') {
        /* getopt_long has moved past the argument at fault; name it as it was written. */
        *arg = argv[at < argc ? at : argc - 1];
        return c == ':' ? KVF__ARGS_NOVALUE : KVF__ARGS_UNKNOWN;
    }
    *arg = optarg;
    return c;
}

void kvf__args_version(const char *prog, FILE *f)
{
    /* the binary's name: "kvf-bench store" is kvf-bench's version */
    size_t n = strcspn(prog, " ");
    fprintf(f, "%.*s (kvfabric) %s\n", (int)n, prog, KVF_VERSION_STRING);
}

static int bad(const kvf__args_spec *s, const char *opt, const char *fmt, const char *a,
               const char *b)
{
    fprintf(stderr, "%s: %s: ", s->prog, opt);
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, " (see --help)\n");
    return 2;
}

/* The range of a number, as the error says it. */
static void range_text(const kvf__arg *a, char *out, size_t len)
{
    if (a->kind == KVF__ARG_REAL)
        snprintf(out, len, "%g..%g", a->lo, a->hi);
    else
        snprintf(out, len, "%.0f..%.0f", a->lo, a->hi);
}

static int out_of_range(const kvf__args_spec *s, const kvf__arg *a, const char *opt, const char *v)
{
    char r[96];
    range_text(a, r, sizeof r);
    return bad(s, opt, "%s is out of range (%s)", v, r);
}

static int read_integer(const kvf__args_spec *s, const kvf__arg *a, const char *opt, const char *v)
{
    char *end = NULL;
    errno = 0;
    if (a->kind == KVF__ARG_U64) {
        if (strchr(v, '-'))
            return bad(s, opt, "%s is not a count (a whole number from 0)%s", v, "");
        unsigned long long x = strtoull(v, &end, 10);
        if (end == v || *end || errno)
            return bad(s, opt, "%s is not a whole number%s", v, "");
        if (a->lo < a->hi && ((double)x < a->lo || (double)x > a->hi))
            return out_of_range(s, a, opt, v);
        *(uint64_t *)a->dst = (uint64_t)x;
        return 0;
    }
    long long x = strtoll(v, &end, 10);
    if (end == v || *end || errno)
        return bad(s, opt, "%s is not a whole number%s", v, "");
    if (a->lo < a->hi && ((double)x < a->lo || (double)x > a->hi))
        return out_of_range(s, a, opt, v);
    if (a->kind == KVF__ARG_INT) {
        if (x < INT32_MIN || x > INT32_MAX)
            return bad(s, opt, "%s is too large%s", v, "");
        *(int *)a->dst = (int)x;
    } else {
        *(long *)a->dst = (long)x;
    }
    return 0;
}

static int apply(const kvf__args_spec *s, const kvf__arg *a, const char *v)
{
    char opt[80];
    snprintf(opt, sizeof opt, "--%s", a->name);
    switch (a->kind) {
    case KVF__ARG_FLAG:
        *(int *)a->dst = 1;
        return 0;
    case KVF__ARG_UNSET:
        *(int *)a->dst = 0;
        return 0;
    case KVF__ARG_STR:
        *(const char **)a->dst = v;
        return 0;
    case KVF__ARG_CHOICE:
        for (const char *const *c = a->choices; c && *c; c++)
            if (!strcmp(*c, v)) {
                *(const char **)a->dst = *c;
                return 0;
            }
        {
            char list[400] = "";
            size_t used = 0;
            for (const char *const *c = a->choices; c && *c && used < sizeof list; c++)
                used += (size_t)snprintf(list + used, sizeof list - used, "%s%s",
                                         c == a->choices ? "" : ", ", *c);
            return bad(s, opt, "\"%s\" is not one of: %s", v, list);
        }
    case KVF__ARG_INT:
    case KVF__ARG_LONG:
    case KVF__ARG_U64:
        return read_integer(s, a, opt, v);
    case KVF__ARG_REAL: {
        char *end = NULL;
        double x = strtod(v, &end);
        if (end == v || *end || !isfinite(x))
            return bad(s, opt, "%s is not a number%s", v, "");
        if (a->lo < a->hi && (x < a->lo || x > a->hi))
            return out_of_range(s, a, opt, v);
        *(double *)a->dst = x;
        return 0;
    }
    case KVF__ARG_SIZE: {
        uint64_t x;
        if (kvf__parse_size(v, &x) != 0)
            return bad(s, opt, "%s is not a size (bytes, or with K, M, G or T: 64K, 256M, 8G)%s", v,
                       "");
        if (a->lo < a->hi && ((double)x < a->lo || (double)x > a->hi)) {
            char lo[32], hi[32];
            kvf__fmt_size((uint64_t)a->lo, lo, sizeof lo);
            kvf__fmt_size((uint64_t)a->hi, hi, sizeof hi);
            if (a->hi >= 1e17) /* no upper bound that matters */
                fprintf(stderr, "%s: %s: %s is below %s (see --help)\n", s->prog, opt, v, lo);
            else
                fprintf(stderr, "%s: %s: %s is out of range (%s..%s) (see --help)\n", s->prog, opt,
                        v, lo, hi);
            return 2;
        }
        *(uint64_t *)a->dst = x;
        return 0;
    }
    case KVF__ARG_FN: {
        char err[300] = "";
        if (a->fn(a->ud, v, err, sizeof err) != 0)
            return bad(s, opt, "%s%s", err[0] ? err : "bad value", "");
        return 0;
    }
    }
    return 2;
}

int kvf__args_parse(const kvf__args_spec *s, int argc, char **argv, int *first_positional)
{
    struct option *lo = calloc(s->n + 3, sizeof *lo);
    char shortopts[3 * 26 + 4] = "h";
    if (!lo) {
        fprintf(stderr, "%s: out of memory\n", s->prog);
        return 1;
    }
    size_t sl = 1;
    for (size_t i = 0; i < s->n; i++) {
        const kvf__arg *a = &s->args[i];
        int takes = a->kind != KVF__ARG_FLAG && a->kind != KVF__ARG_UNSET;
        lo[i] = (struct option){a->name, takes ? required_argument : no_argument, NULL,
                                (int)(VAL_FIRST + i)};
        if (a->short_name && sl + 3 < sizeof shortopts) {
            shortopts[sl++] = a->short_name;
            if (takes)
                shortopts[sl++] = ':';
            shortopts[sl] = '\0';
        }
    }
    lo[s->n] = (struct option){"help", no_argument, NULL, VAL_HELP};
    lo[s->n + 1] = (struct option){"version", no_argument, NULL, VAL_VERSION};
    optind = 0; /* getopt_long starts over (GNU: 0 re-initializes, then reads from 1) */
    int rc = KVF__ARGS_GO_ON;
    for (;;) {
        const char *arg = NULL;
        int c = kvf__args_next(argc, argv, shortopts, lo, &arg);
        if (c == 0)
            break;
        if (c == KVF__ARGS_UNKNOWN) {
            fprintf(stderr, "%s: unknown option %s (see --help)\n", s->prog, arg);
            rc = 2;
        } else if (c == KVF__ARGS_NOVALUE) {
            fprintf(stderr, "%s: %s needs a value (see --help)\n", s->prog, arg);
            rc = 2;
        } else if (c == VAL_HELP) {
            kvf__args_usage(s, stdout);
            rc = 0;
        } else if (c == VAL_VERSION) {
            kvf__args_version(s->prog, stdout);
            rc = 0;
        } else if (c >= VAL_FIRST && (size_t)(c - VAL_FIRST) < s->n && arg &&
                   (!strcmp(arg, "--help") || !strcmp(arg, "-h") || !strcmp(arg, "--version"))) {
            /* "--file --help": the option's value would be "--help"; asked for help, surely */
            if (strcmp(arg, "--version"))
                kvf__args_usage(s, stdout);
            else
                kvf__args_version(s->prog, stdout);
            rc = 0;
        } else if (c >= VAL_FIRST && (size_t)(c - VAL_FIRST) < s->n) {
            rc = apply(s, &s->args[c - VAL_FIRST], arg);
            rc = rc ? rc : KVF__ARGS_GO_ON;
        } else {
            fprintf(stderr, "%s: unknown option %s (see --help)\n", s->prog, arg ? arg : "?");
            rc = 2;
        }
        if (rc != KVF__ARGS_GO_ON)
            break;
    }
    free(lo);
    if (rc != KVF__ARGS_GO_ON)
        return rc;
    int first = optind < argc ? optind : argc;
    if (first < argc && argv[first][0] == '-' && argv[first][1] != '\0' &&
        strcmp(argv[first], "--") != 0) {
        fprintf(stderr, "%s: unknown option %s (see --help)\n", s->prog, argv[first]);
        return 2;
    }
    if (first < argc && !strcmp(argv[first], "--"))
        first++;
    if (s->max_positional >= 0 && argc - first > s->max_positional) {
        fprintf(stderr, "%s: unexpected argument \"%s\" (see --help)\n", s->prog,
                argv[first + s->max_positional]);
        return 2;
    }
    if (first_positional)
        *first_positional = first;
    return KVF__ARGS_GO_ON;
}

/* Prints text from column col, wrapped at USAGE_WIDTH, the first line continuing where the
 * cursor is (at column at). */
static void wrapped(FILE *f, const char *text, int at, int col)
{
    const char *p = text;
    int x = at;
    while (*p) {
        const char *w = p;
        while (*w && *w != ' ' && *w != '\n')
            w++;
        int len = (int)(w - p);
        if (x > col && x + 1 + len > USAGE_WIDTH) {
            fprintf(f, "\n%*s", col, "");
            x = col;
        } else if (x > col) {
            fputc(' ', f);
            x++;
        }
        fwrite(p, 1, (size_t)len, f);
        x += len;
        p = w;
        if (*p == '\n') {
            fprintf(f, "\n%*s", col, "");
            x = col;
        }
        while (*p == ' ' || *p == '\n')
            p++;
    }
}

static void option_line(FILE *f, const char *left, const char *help)
{
    int n = fprintf(f, "  %s", left);
    if (n >= USAGE_COL) {
        fprintf(f, "\n%*s", USAGE_COL, "");
        n = USAGE_COL;
    } else {
        fprintf(f, "%*s", USAGE_COL - n, "");
        n = USAGE_COL;
    }
    wrapped(f, help, n, USAGE_COL);
    fputc('\n', f);
}

void kvf__args_usage(const kvf__args_spec *s, FILE *f)
{
    fprintf(f, "usage: %s %s\n", s->prog, s->synopsis ? s->synopsis : "[OPTIONS]");
    if (s->summary) {
        wrapped(f, s->summary, 0, 0);
        fputc('\n', f);
    }
    fprintf(f, "\noptions:\n");
    for (size_t i = 0; i < s->n; i++) {
        const kvf__arg *a = &s->args[i];
        char left[128], help[1400];
        int takes = a->kind != KVF__ARG_FLAG && a->kind != KVF__ARG_UNSET;
        const char *meta = a->meta                    ? a->meta
                           : a->kind == KVF__ARG_SIZE ? "SIZE"
                           : a->kind == KVF__ARG_REAL ? "X"
                           : a->kind == KVF__ARG_STR  ? "VALUE"
                                                      : "N";
        if (a->short_name)
            snprintf(left, sizeof left, "-%c, --%s%s%s", a->short_name, a->name, takes ? " " : "",
                     takes ? meta : "");
        else
            snprintf(left, sizeof left, "--%s%s%s", a->name, takes ? " " : "", takes ? meta : "");
        size_t used = (size_t)snprintf(help, sizeof help, "%s", a->help ? a->help : "");
        if (a->kind == KVF__ARG_CHOICE && a->choices && used < sizeof help) {
            used +=
                (size_t)snprintf(help + used, sizeof help - used, "%s(one of:", used ? " " : "");
            for (const char *const *c = a->choices; *c && used < sizeof help; c++)
                used += (size_t)snprintf(help + used, sizeof help - used, "%s %s",
                                         c == a->choices ? "" : ",", *c);
            if (used < sizeof help)
                used += (size_t)snprintf(help + used, sizeof help - used, ")");
        } else if (a->lo < a->hi && a->kind != KVF__ARG_SIZE && used < sizeof help) {
            char r[96];
            range_text(a, r, sizeof r);
            used += (size_t)snprintf(help + used, sizeof help - used, " (%s)", r);
        }
        if (a->def && used < sizeof help)
            snprintf(help + used, sizeof help - used, " [default: %s]", a->def);
        option_line(f, left, help);
    }
    option_line(f, "-h, --help", "this text");
    option_line(f, "--version", "the version");
    if (s->epilog) {
        fputc('\n', f);
        wrapped(f, s->epilog, 0, 0);
        fputc('\n', f);
    }
}

int kvf__args_log_level(void *ud, const char *v, char *err, size_t errlen)
{
    if (kvf__log_level_parse(v, &((kvf_log *)ud)->level) == 0)
        return 0;
    snprintf(err, errlen, "\"%s\" is not one of: debug, info, warn, error", v);
    return -1;
}

int kvf__args_log_format(void *ud, const char *v, char *err, size_t errlen)
{
    if (kvf__log_format_parse(v, &((kvf_log *)ud)->format) == 0)
        return 0;
    snprintf(err, errlen, "\"%s\" is not one of: text, json", v);
    return -1;
}
