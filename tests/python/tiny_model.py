"""A tiny decoder in plain torch with a paged KV cache, for the tests of kvfabric.paged: the same
bookkeeping as an engine's (pages, what to load, what to compute, what to save), with real
attention over the pages, on CPU. Random weights from a seed; float32."""

import torch


class TinyModel:
    def __init__(self, layout, vocab=512, hidden=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.layout = layout
        H, D = layout.kv_heads, layout.head_dim
        self.vocab, self.hidden = vocab, hidden

        def w(*shape):
            return torch.randn(*shape, generator=g) / shape[0] ** 0.5

        self.emb = w(vocab, hidden)
        self.layers = [dict(q=w(hidden, H * D), k=w(hidden, H * D), v=w(hidden, H * D),
                            o=w(H * D, hidden)) for _ in range(layout.layers)]

    def layer(self, i, x, cache, page_ids, start):
        """Layer i for positions start.. (x: [n, hidden]); their K and V go into the pages, and
        attention reads every position 0.. from them."""
        L, p = self.layout, self.layers[i]
        H, D = L.kv_heads, L.head_dim
        n = x.shape[0]
        q = (x @ p["q"]).view(n, H, D)
        cache.write(i, page_ids, start, (x @ p["k"]).view(n, H, D), (x @ p["v"]).view(n, H, D))
        k, v = cache.read(i, page_ids, start + n)
        att = torch.einsum("qhd,khd->hqk", q, k) / D ** 0.5
        pos_q = torch.arange(start, start + n)[:, None]
        pos_k = torch.arange(start + n)[None, :]
        att = att.masked_fill(pos_k > pos_q, float("-inf")).softmax(-1)
        out = torch.einsum("hqk,khd->qhd", att, v).reshape(n, H * D)
        return x + out @ p["o"]

    def prefill(self, tokens, cache, page_ids, start=0, before_layer=None):
        """Computes positions start.. of tokens; before_layer(i) is called before layer i (a load
        waits there) and returns False to abandon (a miss: the caller recomputes). Returns the
        next token (greedy), or None when abandoned."""
        x = self.emb[torch.tensor(tokens[start:])]
        for i in range(self.layout.layers):
            if before_layer is not None and not before_layer(i):
                return None
            x = self.layer(i, x, cache, page_ids, start)
        return int((x[-1] @ self.emb.T).argmax())

    def decode(self, tokens, first, cache, page_ids, steps):
        """Greedy decoding of `steps` tokens after the prompt tokens, whose next token is first."""
        out, seq = [first], list(tokens) + [first]
        for _ in range(steps - 1):
            x = self.emb[torch.tensor(seq[-1:])]
            for i in range(self.layout.layers):
                x = self.layer(i, x, cache, page_ids, len(seq) - 1)
            nxt = int((x[-1] @ self.emb.T).argmax())
            out.append(nxt)
            seq.append(nxt)
        return out
