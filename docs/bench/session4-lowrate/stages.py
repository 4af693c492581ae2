#!/usr/bin/env python3
# Reads a /metrics text (before, after) and prints per-stage count, mean, p50, p99
# of jobcast_append_stage_seconds over the difference (log-interpolated in buckets).
import sys, re, math
def parse(path):
    b, s, c = {}, {}, {}
    for l in open(path):
        m = re.match(r'jobcast_append_stage_seconds_(bucket|sum|count)\{(.*)\} (\S+)', l)
        if not m: continue
        kind, labels, v = m.group(1), m.group(2), float(m.group(3))
        st = re.search(r'stage="(\w+)"', labels).group(1)
        if kind == 'bucket':
            le = re.search(r'le="([^"]+)"', labels).group(1)
            b.setdefault(st, []).append((float(le), v))
        elif kind == 'sum': s[st] = v
        else: c[st] = v
    return b, s, c
b1, s1, c1 = parse(sys.argv[1]) if len(sys.argv) > 2 else ({}, {}, {})
b2, s2, c2 = parse(sys.argv[-1])
def q(buckets, prev, p):
    pv = dict(prev)
    pts = [(le, v - pv.get(le, 0)) for le, v in buckets]
    total = pts[-1][1]
    if total == 0: return float('nan')
    target = p * total
    lo, lc = 0.0, 0.0
    for le, v in pts:
        if v >= target:
            if math.isinf(le): return lo
            frac = (target - lc) / max(v - lc, 1e-9)
            base = lo if lo > 0 else le / 2
            return base * (le / base) ** frac
        lo, lc = le, v
    return lo
print(f"{'stage':8} {'count':>7} {'mean us':>8} {'p50 us':>8} {'p99 us':>8}")
for st in ['parse', 'queue', 'commit', 'publish', 'reply', 'deliver']:
    if st not in b2: continue
    n = c2[st] - c1.get(st, 0)
    mean = (s2[st] - s1.get(st, 0)) / n * 1e6 if n else float('nan')
    print(f"{st:8} {int(n):7d} {mean:8.1f} {q(b2[st], b1.get(st, []), .5)*1e6:8.1f} {q(b2[st], b1.get(st, []), .99)*1e6:8.1f}")
