/*
 * Command lines (args.c): the one option parser of every kvfabric binary, on getopt_long.
 *
 * A program describes its options in a table (name, kind, where the value goes, a description,
 * the default as shown, the valid values) and kvf__args_parse() reads argv against it: long
 * options as "--name VALUE" or "--name=VALUE", --help (-h) and --version for free, values checked
 * by kind (numbers, ranges, sizes such as 256M, one of a list), and every error naming the option
 * and the reason, with exit status 2. kvf__args_usage() prints the table as the usage text, so
 * that descriptions, defaults and valid values cannot drift from what is parsed.
 *
 * kvf__args_next() is the step underneath, for commands that walk their options themselves (the
 * kvf subcommands' switch statements): getopt_long with the errors told apart.
 */
#ifndef KVF_ARGS_H
#define KVF_ARGS_H

#include <getopt.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum kvf__arg_kind {
    KVF__ARG_FLAG,   /* no value: *(int *)dst = 1 */
    KVF__ARG_UNSET,  /* no value: *(int *)dst = 0 (--no-x) */
    KVF__ARG_STR,    /* *(const char **)dst, borrowed from argv */
    KVF__ARG_CHOICE, /* *(const char **)dst, one of choices */
    KVF__ARG_INT,    /* *(int *)dst, a decimal integer in [lo, hi] when lo < hi */
    KVF__ARG_LONG,   /* *(long *)dst, likewise */
    KVF__ARG_U64,    /* *(uint64_t *)dst, likewise */
    KVF__ARG_REAL,   /* *(double *)dst, likewise */
    KVF__ARG_SIZE,   /* *(uint64_t *)dst, a byte count: 4096, 64K, 256M, 8G, 1T */
    KVF__ARG_FN,     /* fn(ud, value, err, errlen): 0, or -1 with err set */
} kvf__arg_kind;

typedef struct kvf__arg {
    const char *name; /* without the dashes: "listen" */
    kvf__arg_kind kind;
    void *dst;
    const char *meta;           /* the value's name in the usage: "HOST:PORT" */
    const char *help;           /* what it does, one sentence or two */
    const char *def;            /* the default as shown ("127.0.0.1:7400"), or NULL */
    const char *const *choices; /* CHOICE: the valid values, NULL-terminated */
    double lo, hi;              /* the numbers' range when lo < hi */
    int (*fn)(void *ud, const char *value, char *err, size_t errlen);
    void *ud;
    char short_name; /* a one-letter alias, or 0 */
} kvf__arg;

/* An entry of an options table: KVF__OPT(name, kind, dst, meta, help, default) and, after them,
 * further fields by designator (.choices = ..., .lo = ..., .hi = ..., .fn = ..., .ud = ...,
 * .short_name = ...). */
#define KVF__OPT(NAME, KIND, DST, META, HELP, DEF, ...)                               \
    {                                                                                 \
        .name = (NAME), .kind = (KIND), .dst = (DST), .meta = (META), .help = (HELP), \
        .def = (DEF), __VA_ARGS__                                                     \
    }

typedef struct kvf__args_spec {
    const char *prog;     /* as errors and the usage name it: "kvf-store", "kvf-bench store" */
    const char *synopsis; /* after the program's name: "[OPTIONS]", "[OPTIONS] FILE" */
    const char *summary;  /* what the program does, a line or two */
    const char *epilog;   /* after the options (exit statuses, examples), or NULL */
    const kvf__arg *args;
    size_t n;
    int max_positional; /* arguments that are not options it takes: 0, N, or -1 any number */
} kvf__args_spec;

#define KVF__ARGS_GO_ON (-1)

/* Reads argv[1..argc) against the spec, each value into its variable. Returns KVF__ARGS_GO_ON
 * with *first_positional the index of the first argument that is not an option (argc when none);
 * or 0 after printing the usage (--help) or the version (--version) on stdout; or 2 after
 * printing "PROG: WHAT (see --help)" on stderr: an unknown option, a missing value, a value
 * that does not parse or is out of range, or more positional arguments than allowed. The values
 * read before an error stay written. first_positional may be NULL when none are allowed. */
int kvf__args_parse(const kvf__args_spec *spec, int argc, char **argv, int *first_positional);

/* The usage text: synopsis, summary, every option with its value's name, description, default
 * and valid values, --help and --version, the epilog. */
void kvf__args_usage(const kvf__args_spec *spec, FILE *f);

/* "PROG (kvfabric) VERSION" on f. */
void kvf__args_version(const char *prog, FILE *f);

/* KVF__ARG_FN readers of the daemons' --log-level and --log-format into the kvf_log at ud. */
int kvf__args_log_level(void *ud, const char *value, char *err, size_t errlen);
int kvf__args_log_format(void *ud, const char *value, char *err, size_t errlen);

/* kvf__args_next() returns an option's val, 0 at the end, or one of these. */
#define KVF__ARGS_UNKNOWN (-2) /* *arg: the unknown option, or a stray positional argument */
#define KVF__ARGS_NOVALUE (-3) /* *arg: the option that needs a value */

/* One step of getopt_long over argv from optind (set optind = 1, or 0 to restart, before the
 * first call), stopping at the first argument that is not an option: returns the option's val
 * with *arg its value (or NULL), 0 at the end, or KVF__ARGS_UNKNOWN / KVF__ARGS_NOVALUE with
 * *arg the argument at fault. shortopts as getopt_long's, without the leading "+:". */
int kvf__args_next(int argc, char **argv, const char *shortopts, const struct option *opts,
                   const char **arg);

#endif
