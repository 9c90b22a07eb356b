import csv, sys, collections
rows = list(csv.reader(open(sys.argv[1])))
hdr_i = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
hdr = rows[hdr_i]; ki = hdr.index("Kernel Name"); vi = hdr.index("Metric Value"); ii = hdr.index("ID")
tot = collections.defaultdict(float); cnt = collections.Counter(); seq = []
for r in rows[hdr_i + 1:]:
    if len(r) <= vi: continue
    try: v = float(r[vi].replace(",", ""))
    except ValueError: continue
    name = r[ki][:90]; tot[name] += v; cnt[name] += 1; seq.append((int(r[ii]), name, v))
skip = int(sys.argv[2]) if len(sys.argv) > 2 else 0
allt = sum(tot.values())
print(f"kernels {len(seq)}, total {allt/1e6:.2f} ms (ns units assumed)")
for n, t in sorted(tot.items(), key=lambda x: -x[1])[:45]:
    print(f"{t/1e6:9.3f} ms {100*t/allt:5.1f}% {cnt[n]:6d}  {t/cnt[n]/1e3:8.1f} us  {n}")
