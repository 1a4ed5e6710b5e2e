#!/usr/bin/env python3
"""Generates synthetic request traces in Mooncake's format (one JSON object per line:
timestamp in ms, input_length and output_length in tokens, hash_ids: one id per 512-token block,
prefix-chained, so requests that share ids at the first i positions share (i+1) x 512 tokens).
Deterministic: the same arguments give the same file.

  agentic   agents in tool-call loops: every session starts from one of a few shared system
            prompts (with tool definitions), then each step appends the model's call and the
            tool's result to the context and asks again; short outputs, steps seconds apart,
            sessions arriving at random (Poisson).
  longdoc   long documents (10 to 60 blocks) asked many questions: each request is a document
            (popularity Zipf-like: a few documents draw most questions) followed by a new
            question; arrivals Poisson.

  data/traces/gen_workloads.py agentic --requests 1500 --rate 4 --seed 1 > agentic_gen.jsonl
  data/traces/gen_workloads.py longdoc --requests 1000 --rate 2 --seed 1 > longdoc_gen.jsonl
"""

import argparse
import json
import random
import sys

BLOCK = 512


class Ids:
    """Fresh hash ids, never reused: a shared id means a shared block."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> list:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def agentic(a, r: random.Random):
    ids = Ids()
    systems = [ids.take(r.randint(2, 8)) for _ in range(a.system_prompts)]
    events, t, sid = [], 0.0, 0
    while len(events) < a.requests:
        t += r.expovariate(a.rate / a.steps)  # sessions arrive so that requests come at `rate`
        ctx = list(r.choice(systems)) + ids.take(r.randint(1, 3))  # the user's task
        step_t = t
        for _ in range(r.randint(max(1, a.steps // 2), a.steps * 2)):
            tail = r.randint(1, BLOCK - 1)  # the last, partial block
            n_in = len(ctx) * BLOCK + tail
            out = r.randint(20, 300)  # a tool call, or the final answer
            events.append((step_t, n_in, out, list(ctx) + ids.take(1)))
            # the call and the tool's result join the context: one to four new blocks
            ctx = ctx + ids.take(r.randint(1, 4))
            step_t += r.uniform(0.5, 6.0)  # the tool runs, the next step is asked
        sid += 1
    return events


def longdoc(a, r: random.Random):
    ids = Ids()
    docs = [ids.take(r.randint(10, 60)) for _ in range(a.documents)]
    weights = [1.0 / (k + 1) ** 1.1 for k in range(a.documents)]  # Zipf-like popularity
    events, t = [], 0.0
    for _ in range(a.requests):
        t += r.expovariate(a.rate)
        doc = r.choices(docs, weights)[0]
        q = ids.take(1)  # a new question, under a block
        n_in = len(doc) * BLOCK + r.randint(20, 400)
        events.append((t, n_in, r.randint(50, 600), list(doc) + q))
    return events


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["agentic", "longdoc"])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=2.0, help="requests per second, on average")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--system-prompts", type=int, default=4, help="agentic: shared system prompts")
    ap.add_argument("--steps", type=int, default=8, help="agentic: typical steps per session")
    ap.add_argument("--documents", type=int, default=40, help="longdoc: documents")
    a = ap.parse_args()
    r = random.Random(a.seed)
    events = agentic(a, r) if a.kind == "agentic" else longdoc(a, r)
    events = sorted(events, key=lambda e: e[0])[: a.requests]
    for t, n_in, out, hids in events:
        sys.stdout.write(json.dumps({"timestamp": int(t * 1000), "input_length": n_in,
                                     "output_length": out, "hash_ids": hids}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
