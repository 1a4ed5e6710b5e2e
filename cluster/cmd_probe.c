/*
 * kvf probe [--engine NAME] [--json]: runs this host's probes (probe.c) and prints what each
 * found, the memory pressure and the capability record they make.
 */
#include "cmd_probe.h"

#include "cli_common.h"
#include "probe.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>

enum { OPT_ENGINE = KVF__CLI_OPT_OWN };

static const struct option probe_opts[] = {
    {"engine", required_argument, NULL, OPT_ENGINE},
    KVF__CLI_OPTS_JSON,
    KVF__CLI_OPTS_HELP,
    KVF__CLI_OPTS_END,
};

static const char probe_usage[] =
    "usage: kvf probe [--engine NAME] [--json]\n"
    "Fills this host's capability record by executing tiny actions (bind a TCP listener, open\n"
    "RDMA devices, lock memory, load the CUDA runtime, read telemetry) and prints each outcome.\n"
    "  --engine NAME                    the record's engine: its features from the built-in\n"
    "                                   record of that name (default: a bare "
    "host)\n" KVF__CLI_HELP_JSON
    "exit status: 0 done, 1 the record cannot be made, 2 a usage error\n";

/* Prints the report, its telemetry and the record (a JSON text) as one JSON object. */
static void print_probe_json(const kvf_probe_report *r, const char *rec)
{
    json_t *steps = json_array();
    for (int i = 0; i < r->n_steps; i++)
        json_array_append_new(steps, json_pack("{s:s,s:b,s:s}", "probe", r->steps[i].name, "ok",
                                               r->steps[i].ok, "detail", r->steps[i].detail));
    json_t *rj = json_loads(rec, 0, NULL);
    const kvf_cuda_info *ci = &r->cuda;
    json_t *cj = json_pack(
        "{s:b,s:i,s:i,s:i,s:i,s:i,s:i,s:b,s:i,s:s,s:s}", "usable", ci->usable, "runtime_version",
        ci->runtime_version, "driver_version", ci->driver_version, "devices", ci->devices,
        "cc_major", ci->cc_major, "cc_minor", ci->cc_minor, "sm_count", ci->sm_count, "batch_copy",
        ci->batch_copy, "nvrtc_version", ci->nvrtc_version, "library", ci->library, "why", ci->why);
    const kvf_telemetry *t = &r->telemetry;
    json_t *o = json_pack(
        "{s:o,s:o,s:o,s:{s:I,s:I,s:b,s:f,s:f,s:b,s:I,s:I,s:f},s:s}", "record", rj, "probes", steps,
        "cuda", cj, "telemetry", "mem_total", (json_int_t)t->mem_total, "mem_available",
        (json_int_t)t->mem_available, "have_psi", t->have_psi, "psi_some_avg10", t->psi_some_avg10,
        "psi_full_avg10", t->psi_full_avg10, "have_cgroup", t->have_cgroup, "cgroup_limit",
        (json_int_t)(t->cgroup_limit == UINT64_MAX ? -1 : (json_int_t)t->cgroup_limit),
        "cgroup_usage", (json_int_t)t->cgroup_usage, "pressure", kvf_telemetry_pressure(t), "label",
        "real");
    char *txt = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
    printf("%s\n", txt);
    free(txt);
    json_decref(o);
}

static void print_probe_text(const kvf_probe_report *r, const char *rec)
{
    for (int i = 0; i < r->n_steps; i++)
        printf("%-10s %-4s %s\n", r->steps[i].name, r->steps[i].ok ? "ok" : "no",
               r->steps[i].detail);
    printf("pressure   %.2f (0 idle .. 1 exhausted)\nrecord     %s\n",
           kvf_telemetry_pressure(&r->telemetry), rec);
}

int kvf__cli_probe(int argc, char **argv)
{
    const char *engine = NULL, *v;
    int json = 0, c;
    while ((c = kvf__cli_next_opt(argc, argv, probe_opts, &v)) != 0) {
        if (c == 'h') {
            fputs(probe_usage, stdout);
            return 0;
        } else if (c == OPT_ENGINE) {
            engine = v;
        } else if (c == KVF__CLI_OPT_JSON) {
            json = 1;
        } else {
            return kvf__cli_opt_error(c, v);
        }
    }
    kvf_probe_report r;
    kvf__probe_host(&r, engine);
    char *rec = kvf_caps_to_json(&r.caps);
    if (!rec)
        return 1;
    if (json)
        print_probe_json(&r, rec);
    else
        print_probe_text(&r, rec);
    free(rec);
    return 0;
}
