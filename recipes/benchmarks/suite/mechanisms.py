"""Per-mechanism cases: what one mechanism promises, measured against its own alternative (``--cases``).

- ``span`` (adaptive span, Sukhbaatar et al. 2019): one ``adaptive_span`` layer at the steady state of
  segment-level recurrence, max span S, with every head at S (``full``: the window and cache are S) or with
  learned short spans (``short``: heads spread geometrically over 64..512 positions, the window is the
  longest span + ramp rounded up to 64, whatever S is). Per (S, setting): an evaluation forward (cache of
  layer inputs and their keys/values) and a training forward + backward (keys/values recomputed), time,
  peak memory and the cache size. ``full / short`` is what trimming saves; ``short`` stays flat in S.
- ``compressive`` (Rae et al. 2020): one layer in training at the steady state, three models over the same
  past: ``xl`` (relative attention, memory P), ``compressive`` (memory M + compressed memory N at rate c,
  M + c N = P, conv compression with its attention-reconstruction loss included) and ``xl_same_keys``
  (memory M + N: the compressive model's keys, a shorter span). Per model: keys per query, attention
  GFLOPs (``6 B T S D + 4 B (S - T) D^2``), median seconds per segment (interleaved rounds), the bytes
  autograd saves for backward (``memory.count_saved_tensors``) and the recurrent state's bytes.
- ``decode`` (linear attention, Katharopoulos et al. 2020, RNN mode): one layer without gradients, ms per
  generated token after a prefix of P positions (P = 64 and the largest), ``linear`` (state (S, Z)) against
  ``full`` (K/V cache of P positions).
- ``linear_backward``: our causal linear attention with its recomputing backward (``CausalLinearAttention``)
  against the same chunked forward differentiated by autograd (which also saves the chunk products and
  states): forward + backward time, peak memory and bytes saved for backward per N.
- ``relative_routes`` (Transformer-XL, Dai et al. 2019): one relative layer forward + backward without memory
  at several (B, T, D), through ``distance_bias.py`` and through the former route (gathered bias, one SDPA
  call, checkpointed chunks), whatever ``distance_bias_applies`` would choose: where its threshold
  ``MIN_SCORE_ELEMENTS`` (H x T x S scores per sequence) comes from.
- ``reversible`` (Reformer, Kitaev et al. 2020): one training step of an LSH model (2 hashes, D 256, FFN
  1024, byte vocabulary) at depth 1 ... 12, plain against ``--reversible --ffn-chunks 4``: peak memory as
  a function of depth (reversible stays flat).

Every case runs in its own process (``isolate``); times are medians after a warm-up step and peaks come
from ``recipes.benchmarks.memory.peak_memory`` (what the step adds above what was held before it).
"""

import statistics
import time
from types import SimpleNamespace
from typing import Dict, List

import torch

from ..memory import count_saved_tensors, peak_memory, saved_tensor_bytes

CASES = ("span", "compressive", "decode", "linear_backward", "relative_routes", "reversible")
# setting: (full, --quick, --smoke); the full sizes are those of the former per-mechanism scripts
SIZES = {
    "span": {"D": (512, 256, 32), "H": (8, 4, 2), "T": (512, 256, 32), "repeats": (3, 2, 1),
             "spans": ([1024, 2048, 4096, 8192], [1024, 2048, 4096, 8192], [1024])},
    "compressive": {"D": (512, 256, 32), "H": (8, 4, 2), "T": (512, 128, 16), "mem_len": (512, 128, 16),
                    "cmem_len": (512, 128, 8), "rate": (4, 4, 2), "batch": (2, 2, 1), "repeats": (5, 3, 1)},
    "decode": {"D": (256, 256, 32), "H": (4, 4, 2), "positions": ([64, 16384], [64, 4096], [8, 64]),
               "steps": (64, 32, 2)},
    "linear_backward": {"D": (256, 256, 32), "H": (4, 4, 2), "lengths": ([512, 1024, 2048, 4096, 8192, 16384],
                        [1024, 4096], [128]), "repeats": (3, 2, 1)},
    "relative_routes": {"H": (4, 4, 2), "D": (None, None, None), "repeats": (5, 5, 1),  # shapes: (B, T, D)
                        "shapes": ([(16, 64, 128), (16, 128, 128), (8, 256, 128), (1, 512, 256), (1, 1024, 256)],
                                   [(16, 64, 128), (16, 128, 128), (8, 256, 128), (1, 512, 256), (1, 1024, 256)],
                                   [(2, 16, 32)])},
    "reversible": {"D": (256, 256, 32), "H": (4, 4, 2), "N": (4096, 2048, 128),
                   "depths": ([1, 2, 4, 8, 12], [1, 4, 12], [1, 2])},
}  # fmt: skip
CHUNK = 64  # linear attention's chunk and LSH's bucket, as in the layer section


def specs(cases: List[str], level: int, device: str) -> List[Dict]:
    """One spec per process to run, in order."""
    out = []
    for case in cases:
        s = {name: values[level] for name, values in SIZES[case].items()}
        base = {"case": case, "D": s["D"], "H": s["H"], "device": device}
        if case == "span":
            out += [{**base, "T": s["T"], "repeats": s["repeats"], "max_span": span, "setting": setting, "kind": kind}
                    for span in s["spans"] for setting in ("full", "short") for kind in ("eval", "train")]  # fmt: skip
        elif case == "compressive":
            out.append({**base, **{k: s[k] for k in ("T", "mem_len", "cmem_len", "rate", "batch", "repeats")}})
        elif case == "decode":
            out += [{**base, "impl": impl, "position": p, "steps": s["steps"]}
                    for p in s["positions"] for impl in ("linear", "full")]  # fmt: skip
        elif case == "linear_backward":
            out += [{**base, "impl": impl, "N": n, "repeats": s["repeats"]}
                    for n in s["lengths"] for impl in ("custom", "autograd")]  # fmt: skip
        elif case == "relative_routes":
            out += [{**base, "B": b, "T": t, "D": d, "repeats": s["repeats"], "impl": impl}
                    for b, t, d in s["shapes"] for impl in ("distance_bias", "former")]  # fmt: skip
        else:
            out += [{**base, "N": s["N"], "layers": depth, "reversible": rev}
                    for depth in s["depths"] for rev in (False, True)]  # fmt: skip
    return out


def measure(spec: Dict) -> Dict:
    """Worker side: the measurement of one spec."""
    torch.manual_seed(0)
    return {"span": span_case, "compressive": compressive_case, "decode": decode_case,
            "linear_backward": linear_backward_case, "relative_routes": relative_routes_case,
            "reversible": reversible_case}[spec["case"]](spec)  # fmt: skip


def timed_steps(step, repeats: int, device: torch.device) -> Dict:
    """A warm-up step, then ``repeats`` timed steps (median ms), the first of them measured for its peak (as
    the layer section does)."""
    step()
    times = []

    def timed():
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))

    peak, _ = peak_memory(timed, device)
    for _ in range(repeats - 1):
        timed()
    return {"ms": statistics.median(times), "peak_mb": peak / 2**20}


# ---- adaptive span -----------------------------------------------------------------------------------------
def short_spans(heads: int) -> List[float]:
    """Spans spread geometrically from 64 to 512 positions over the heads."""
    return [512.0] if heads == 1 else [64.0 * 8.0 ** (h / (heads - 1)) for h in range(heads)]


def span_case(spec: Dict) -> Dict:
    from plugins.attention import build_attention
    from plugins.memory import HiddenMemory

    device = torch.device(spec["device"])
    D, H, T, S = spec["D"], spec["H"], spec["T"], spec["max_span"]
    options = SimpleNamespace(max_span=S, span_ramp=32, span_init=1.0, span_loss_weight=0.0, persistent_mem_size=0)
    attn = build_attention("adaptive_span", D, H, dropout=0.0, options=options).to(device)
    if spec["setting"] == "short":
        attn.span_fraction.data = torch.tensor(short_spans(H), device=device) / S
    train = spec["kind"] == "train"
    attn.train(train)
    window = attn.window()
    with torch.set_grad_enabled(train):
        cache = attn.cache_length(keep=S, window=window)  # the steady-state cache of this mode
    with torch.no_grad():
        hidden = torch.randn(1, cache, D, device=device)  # B x cache x D
        keys, values = (None, None) if train else attn.keys_values(hidden, None)
    mem = HiddenMemory(hidden, keys, values)
    x = torch.randn(1, T, D, device=device, requires_grad=train)  # B x T x D

    def step():
        with torch.set_grad_enabled(train):
            out, _ = attn(x, mem, keep=S)
            if train:
                out.square().mean().backward()

    cache_mb = sum(t.numel() * t.element_size() for t in (hidden, keys, values) if t is not None) / 2**20
    return {"window": window, "cache": cache, "cache_mb": cache_mb, **timed_steps(step, spec["repeats"], device)}


# ---- compressive memory ------------------------------------------------------------------------------------
def compressive_case(spec: Dict) -> Dict:
    from plugins.attention import build_attention

    device = torch.device(spec["device"])
    D, H, T, B = spec["D"], spec["H"], spec["T"], spec["batch"]
    span, keys = spec["mem_len"] + spec["rate"] * spec["cmem_len"], spec["mem_len"] + spec["cmem_len"]
    base = dict(clamp_len=0, same_length=False, untie_r=False, pos_emb="relative", cmem_len=0, compression_rate=1,
                compression_fn="conv", compression_loss="attention_reconstruction", compression_loss_weight=1.0)  # fmt: skip
    compressive = dict(base, cmem_len=spec["cmem_len"], compression_rate=spec["rate"])
    models = {  # name: (attention, options, memory kept, description)
        "xl": ("relative", base, span, f"relative, mem {span} (same span)"),
        "xl_same_keys": ("relative", base, keys, f"relative, mem {keys} (same keys, span {keys})"),
        "compressive": ("compressive", compressive, spec["mem_len"],
                        f"compressive, mem {spec['mem_len']} + cmem {spec['cmem_len']} x c {spec['rate']}"),
    }  # fmt: skip
    built, mems = {}, {}
    for name, (attention, options, keep, _) in models.items():
        torch.manual_seed(0)
        built[name] = build_attention(attention, D, H, 0.0, SimpleNamespace(**options)).to(device).train()
        mem = None
        with torch.no_grad():  # warm-up segments until the memories hold their steady-state sizes
            for _ in range(span // T + 2):
                _, mem = built[name](torch.randn(B, T, D, device=device), mem, keep)
        mem.keys = mem.values = None  # training recomputes them (no cache with gradients)
        mems[name] = mem
    runs: Dict[str, List[Dict]] = {name: [] for name in models}
    for _ in range(spec["repeats"]):  # interleaved: every model once per round
        for name, (_, _, keep, _) in models.items():
            attn, mem = built[name], mems[name]
            x = torch.randn(B, T, D, device=device)  # B x T x D
            attn.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with count_saved_tensors() as saved:
                out, new_mem = attn(x, mem, keep)
                aux = sum(t.weight * t.value for t in attn.aux_losses(new_mem).values())
                loss = out.float().square().mean() + aux
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            state = sum(t.numel() * t.element_size() for t in vars(mem).values() if isinstance(t, torch.Tensor))
            runs[name].append({"seconds": time.perf_counter() - start, "saved_mb": saved["bytes"] / 2**20,
                               "state_mb": state / 2**20,
                               "keys": T + mem.length + getattr(mem, "compressed_length", 0)})  # fmt: skip
            mems[name] = new_mem.detach()  # the next segment continues the stream
            mems[name].keys = mems[name].values = None
    out = {"span": span, "models": {}}
    for name, (_, _, _, desc) in models.items():
        last = runs[name][-1]
        gflop = (6 * B * T * last["keys"] * D + 4 * B * (last["keys"] - T) * D * D) / 1e9
        out["models"][name] = {"desc": desc, "keys": last["keys"], "gflop": gflop, "saved_mb": last["saved_mb"],
                               "state_mb": last["state_mb"],
                               "seconds": statistics.median(r["seconds"] for r in runs[name])}  # fmt: skip

    def paired(a: str, b: str) -> float:  # per round (the same load), then the median
        return statistics.median(x["seconds"] / y["seconds"] for x, y in zip(runs[a], runs[b]))

    out["xl_over_compressive_time"] = paired("xl", "compressive")
    out["compressive_over_same_keys_time"] = paired("compressive", "xl_same_keys")
    return out


# ---- linear attention --------------------------------------------------------------------------------------
def decode_case(spec: Dict) -> Dict:
    from plugins.attention import build_attention

    device = torch.device(spec["device"])
    attn = build_attention(spec["impl"], spec["D"], spec["H"], 0.0, SimpleNamespace(linear_chunk_size=CHUNK))
    attn = attn.to(device).eval()
    times = []
    with torch.no_grad():
        _, mem = attn(torch.randn(1, spec["position"], spec["D"], device=device), None, keep=None)  # the prefix
        for _ in range(spec["steps"] + 2):
            x = torch.randn(1, 1, spec["D"], device=device)  # one new position
            start = time.perf_counter()
            _, mem = attn(x, mem, keep=None)
            times.append(time.perf_counter() - start)
    return {"ms_per_token": 1000 * statistics.median(times[2:])}


def linear_backward_case(spec: Dict) -> Dict:
    from plugins.attention import build_attention
    from plugins.attention.linear import EPS, causal_dot_product_reference

    device = torch.device(spec["device"])
    attn = build_attention("linear", spec["D"], spec["H"], 0.0, SimpleNamespace(linear_chunk_size=CHUNK)).to(device)
    if spec["impl"] == "custom":

        def forward(x):
            return attn(x, None, keep=0)[0]

    else:

        def forward(x):
            q = attn.split_heads(attn.q_proj(x))  # B x H x N x Dh
            k, v = (attn.split_heads(t) for t in attn.kv_proj(x).chunk(2, dim=-1))
            fq, fk = attn.feature_map(q, True), attn.feature_map(k, False)
            v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # B x H x N x (Dh + 1)
            num_den = causal_dot_product_reference(fq, fk, v1, CHUNK)
            return attn.out_proj(attn.merge_heads(num_den[..., :-1] / (num_den[..., -1:] + EPS)))

    x = torch.randn(1, spec["N"], spec["D"], device=device, requires_grad=True)  # B x N x D

    def step():
        forward(x).sum().backward()
        x.grad = None

    result = timed_steps(step, spec["repeats"], device)
    return {**result, "saved_mb": saved_tensor_bytes(forward, x) / 2**20}


# ---- relative attention: the two routes ------------------------------------------------------------------
def relative_routes_case(spec: Dict) -> Dict:
    from plugins.attention import build_attention, relative

    route = spec["impl"] == "distance_bias"
    device = torch.device(spec["device"])
    attn = build_attention("relative", spec["D"], spec["H"], 0.0, SimpleNamespace(pos_emb="relative")).to(device)
    x = torch.randn(spec["B"], spec["T"], spec["D"], device=device, requires_grad=True)  # B x T x D

    def step():
        attn(x, None, 0)[0].sum().backward()
        x.grad = None

    chooses = relative.distance_bias_applies
    relative.distance_bias_applies = lambda q, num_keys, chunk: route and q.dtype == torch.float32
    try:
        return {**timed_steps(step, spec["repeats"], device), "scores": spec["H"] * spec["T"] ** 2}
    finally:
        relative.distance_bias_applies = chooses


# ---- reversible layers ---------------------------------------------------------------------------------
def reversible_case(spec: Dict) -> Dict:
    from fairseq.data import Dictionary

    from plugins.models.efficient_lm import EfficientLM, EfficientLMConfig

    d = Dictionary()
    for b in range(256):
        d.add_symbol(str(b))
    cfg = EfficientLMConfig()
    values = dict(attention="lsh", lsh_n_hashes=2, lsh_bucket_size=CHUNK, lsh_chunk_size=CHUNK, pos_emb="sinusoidal",
                  decoder_layers=spec["layers"], decoder_embed_dim=spec["D"], decoder_ffn_embed_dim=4 * spec["D"],
                  decoder_attention_heads=spec["H"], decoder_normalize_before=True, dropout=0.0,
                  reversible=spec["reversible"], ffn_chunks=4 if spec["reversible"] else 1,
                  tokens_per_sample=spec["N"], max_target_positions=spec["N"], share_decoder_input_output_embed=True)  # fmt: skip
    for k, v in values.items():
        setattr(cfg, k, v)
    device = torch.device(spec["device"])
    model = EfficientLM.build_model(cfg, SimpleNamespace(source_dictionary=d, target_dictionary=d)).to(device).train()
    tokens = torch.randint(4, len(d), (1, spec["N"]), device=device)  # B x N

    def step():
        model.zero_grad(set_to_none=True)
        logits, _ = model(tokens)
        torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), tokens.view(-1)).backward()

    return {**timed_steps(step, 1, device), "params": sum(p.numel() for p in model.parameters())}


# ---- tables ------------------------------------------------------------------------------------------------
def tables(rows: List[Dict]) -> List[str]:
    parts = []
    by_case = {c: [r for r in rows if r.get("case") == c] for c in CASES}
    failed = [r for r in rows if r["status"] != "ok"]
    ok = {c: [r for r in rs if r["status"] == "ok"] for c, rs in by_case.items()}
    if ok["span"]:
        parts += _span_table(ok["span"])
    if ok["compressive"]:
        parts += _compressive_table(ok["compressive"][0])
    if ok["decode"]:
        parts += ["### Decoding one layer (no gradients): ms per token after P positions", "",
                  "| P | linear | full | full / linear |", "|---:|---:|---:|---:|"]  # fmt: skip
        by = {(r["impl"], r["position"]): r["ms_per_token"] for r in ok["decode"]}
        for p in sorted({r["position"] for r in ok["decode"]}):
            lin, full = by.get(("linear", p)), by.get(("full", p))
            ratio = f"{full / lin:.1f}x" if lin and full else "–"
            parts.append(f"| {p} | {lin or 0:.3f} | {full or 0:.3f} | {ratio} |")
        parts.append("")
    if ok["linear_backward"]:
        parts += ["### Linear attention: recomputing backward vs autograd (one layer, forward + backward)", "",
                  "| N | custom ms / peak MB / saved MB | autograd ms / peak MB / saved MB |", "|---:|---|---|"]  # fmt: skip
        by = {(r["impl"], r["N"]): r for r in ok["linear_backward"]}
        for n in sorted({r["N"] for r in ok["linear_backward"]}):
            cells = [f"{by[i, n]['ms']:.1f} / {by[i, n]['peak_mb']:.0f} / {by[i, n]['saved_mb']:.1f}"
                     if (i, n) in by else "–" for i in ("custom", "autograd")]  # fmt: skip
            parts.append(f"| {n} | " + " | ".join(cells) + " |")
        parts.append("")
    if ok["relative_routes"]:
        parts += ["### Relative attention: distance_bias.py vs the former route (one layer, forward + backward)", "",
                  "| B x T, D | H x T x S per sequence | distance_bias ms | former ms | distance_bias / former |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        by = {(r["impl"], r["B"], r["T"], r["D"]): r for r in ok["relative_routes"]}
        for b, t, d in sorted({(r["B"], r["T"], r["D"]) for r in ok["relative_routes"]}, key=lambda s: s[1]):
            new, old = by.get(("distance_bias", b, t, d)), by.get(("former", b, t, d))
            if new and old:
                parts.append(f"| {b} x {t}, {d} | {new['scores']:,} | {new['ms']:.1f} | {old['ms']:.1f} | "
                             f"{new['ms'] / old['ms']:.2f}x |")  # fmt: skip
        parts.append("")
    if ok["reversible"]:
        r0 = ok["reversible"][0]
        parts += [f"### LSH model training step vs depth (D {r0['D']}, T {r0['N']}; reversible with --ffn-chunks 4)",
                  "", "| layers | plain peak MB | reversible peak MB | plain s | reversible s |",
                  "|---:|---:|---:|---:|---:|"]  # fmt: skip
        by = {(r["reversible"], r["layers"]): r for r in ok["reversible"]}
        for n in sorted({r["layers"] for r in ok["reversible"]}):
            p, v = by.get((False, n)), by.get((True, n))
            cells = [f"{x['peak_mb']:.0f}" if x else "–" for x in (p, v)] + [
                f"{x['ms'] / 1000:.2f}" if x else "–" for x in (p, v)]  # fmt: skip
            parts.append(f"| {n} | " + " | ".join(cells) + " |")
        parts.append("")
    for r in failed:
        parts.append(f"- {r.get('case')} {({k: r.get(k) for k in ('impl', 'N', 'max_span', 'layers') if k in r})}: "
                     f"{r['status']} ({r.get('error', '')})")  # fmt: skip
    return parts


def _span_table(rows: List[Dict]) -> List[str]:
    r0 = rows[0]
    lines = [f"### Adaptive span: one layer, full cache vs learned short spans (D {r0['D']}, H {r0['H']}, T {r0['T']})",
             "", "| S | setting | window | cache (pos / MB) | eval fwd ms | train fwd+bwd ms | eval peak MB | "
             "train peak MB |", "|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    by = {(r["max_span"], r["setting"], r["kind"]): r for r in rows}
    for S in sorted({r["max_span"] for r in rows}):
        for setting in ("full", "short"):
            ev, tr = by.get((S, setting, "eval")), by.get((S, setting, "train"))
            if ev and tr:
                lines.append(f"| {S} | {setting} | {ev['window']} | {ev['cache']} / {ev['cache_mb']:.1f} | "
                             f"{ev['ms']:.1f} | {tr['ms']:.1f} | {ev['peak_mb']:.0f} | {tr['peak_mb']:.0f} |")  # fmt: skip
        f_ev, s_ev, f_tr, s_tr = (by.get((S, s, k)) for s, k in
                                  (("full", "eval"), ("short", "eval"), ("full", "train"), ("short", "train")))  # fmt: skip
        if all((f_ev, s_ev, f_tr, s_tr)):
            lines.append(f"| {S} | **full / short** | | {f_ev['cache_mb'] / s_ev['cache_mb']:.1f}x | "
                         f"{f_ev['ms'] / s_ev['ms']:.1f}x | {f_tr['ms'] / s_tr['ms']:.1f}x | "
                         f"{f_ev['peak_mb'] / max(s_ev['peak_mb'], 1):.1f}x | "
                         f"{f_tr['peak_mb'] / max(s_tr['peak_mb'], 1):.1f}x |")  # fmt: skip
    return lines + [""]


def _compressive_table(r: Dict) -> List[str]:
    lines = [f"### Compressive memory vs XL memory over the same past ({r['span']} positions; D {r['D']}, T {r['T']}, "
             f"batch {r['batch']}, one layer, forward + backward)", "",
             "| model | keys per query | attention GFLOP | s / segment | saved for backward MB | state MB |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for m in r["models"].values():
        lines.append(f"| {m['desc']} | {m['keys']} | {m['gflop']:.2f} | {m['seconds']:.3f} | {m['saved_mb']:.0f} | "
                     f"{m['state_mb']:.1f} |")  # fmt: skip
    xl, ct, same = (r["models"][k] for k in ("xl", "compressive", "xl_same_keys"))
    lines += ["", f"xl / compressive: keys {xl['keys'] / ct['keys']:.2f}x, FLOPs {xl['gflop'] / ct['gflop']:.2f}x, "
              f"time {r['xl_over_compressive_time']:.2f}x (median paired), saved-for-backward "
              f"{xl['saved_mb'] / ct['saved_mb']:.2f}x, state {xl['state_mb'] / ct['state_mb']:.2f}x; compressive / "
              f"xl with the same keys: time {r['compressive_over_same_keys_time']:.2f}x, saved-for-backward "
              f"{ct['saved_mb'] / same['saved_mb']:.2f}x", ""]  # fmt: skip
    return lines
