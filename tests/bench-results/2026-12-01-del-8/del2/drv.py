# Scratch driver (not committed): runs inside the lab node's netns.
import json, os, subprocess, sys, time, threading, resource
N = int(os.environ.get("N", "50")); C = int(os.environ.get("C", "8"))
net, confdir, prefix, op_list = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
env = dict(os.environ, NETCONFPATH=confdir, CNI_PATH="/run/vnet-lab/d2/cni-bin:/usr/lib/cni")
pods = [f"{prefix}{i}" for i in range(N)]
def stat():
    f = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return (sum(f) - f[3] - f[4]) * 10.0, (f[3] + f[4]) * 10.0
def phase(op, conc):
    it = iter(pods); lock = threading.Lock(); ms = []
    def worker():
        while True:
            with lock:
                p = next(it, None)
            if p is None: return
            t = time.monotonic()
            r = subprocess.run(["/usr/local/bin/cnitool", op, net, f"/var/run/netns/{p}"], env=env, capture_output=True)
            d = (time.monotonic() - t) * 1e3
            if r.returncode != 0: print("FAIL", op, p, r.stdout[-200:], r.stderr[-300:], file=sys.stderr)
            with lock: ms.append(d)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN); b0, i0 = stat(); t0 = time.monotonic()
    ts = [threading.Thread(target=worker) for _ in range(conc)]
    [t.start() for t in ts]; [t.join() for t in ts]
    wall = time.monotonic() - t0; b1, i1 = stat(); ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cl = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) * 1e3
    ms.sort()
    return dict(op=op, conc=conc, pods_s=round(N / wall, 1), p50=round(ms[len(ms)//2], 2),
                clients_ms=round(cl / N, 2), machine_ms=round((b1 - b0) / N, 2), idle_pct=round(100 * (i1 - i0) / (wall * 2000), 1))
out = []
for o in op_list:
    op, conc = o.split(":")
    r = phase(op, int(conc)); out.append(r)
    if os.environ.get("SLEEP"): time.sleep(float(os.environ["SLEEP"]))
print(json.dumps(out))
