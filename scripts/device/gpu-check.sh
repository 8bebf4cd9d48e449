#!/usr/bin/env bash
# One prepared run on a GPU machine (the `device` tool), writing its report to $OUT:
#  1. the agent's NVML discovery and statistics (`greenthread gpus`) next to nvidia-smi;
#  2. the sidecar's measurement of an engine process that takes and frees GPU memory
#     (`--engine process`, a PyTorch engine holding 2 GiB): serving bytes measured by
#     NVML per process after boot, nothing held after sleep, the same after a wake;
#  3. host-to-device copy bandwidth from pinned memory, which bounds every wake;
#  4. `greenthread local` on the real GPU 0 (`gpus: {devices: [0]}`) with two PyTorch
#     process engines that do not fit together: a request to the second preempts the
#     first; the ledger's reservations against nvidia-smi's per-process memory.
# Needs a release build of greenthread at target/release/greenthread (carried over) and
# PyTorch on the machine.
set -uo pipefail
fail=0
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
BIN="${GREENTHREAD_BIN:-target/release/greenthread}"
exec > >(tee "$OUT/report.txt") 2>&1

echo "== 1. NVML discovery and stats vs nvidia-smi"
nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw \
  --format=csv,noheader,nounits | tee "$OUT/nvidia-smi.csv"
"$BIN" gpus | tee "$OUT/greenthread-gpus.json"
python3 - "$OUT" <<'PY'
import csv, json, sys
out = sys.argv[1]
smi = list(csv.reader(open(f"{out}/nvidia-smi.csv")))
ours = json.load(open(f"{out}/greenthread-gpus.json"))
bad = [] if len(smi) == len(ours) else [f"{len(smi)} GPUs in nvidia-smi, {len(ours)} in ours"]
for row, g in zip(smi, ours):
    idx, uuid, name, total_mib, used_mib = [c.strip() for c in row[:5]]
    ours_total, ours_used = g["memoryBytes"] / 2**20, g["stats"]["usedMemoryBytes"] / 2**20
    print(f"gpu {idx}: uuid smi={uuid} ours={g['uuid']}; name smi={name} ours={g['product']}; "
          f"total MiB smi={total_mib} ours={ours_total:.0f}; used MiB smi={used_mib} ours={ours_used:.0f}; "
          f"temp={g['stats']['temperatureCelsius']} power={g['stats']['powerWatts']:.1f} W")
    if uuid != g["uuid"]: bad.append(f"gpu {idx}: uuid")
    if name != g["product"]: bad.append(f"gpu {idx}: name")
    if abs(float(total_mib) - ours_total) > 1: bad.append(f"gpu {idx}: total memory")
    # Sampled a moment apart: within 256 MiB.
    if abs(float(used_mib) - ours_used) > 256: bad.append(f"gpu {idx}: used memory")
print("step 1:", "PASS" if not bad else "FAIL " + ", ".join(bad))
sys.exit(1 if bad else 0)
PY
[ $? = 0 ] || fail=1

echo "== 2. the sidecar measures a process that takes and frees GPU memory"
PUB=18080 PRIV=18090 ENG=18001
"$BIN" sidecar --model torch-engine --engine process \
  --engine-command "python3 scripts/device/torch_engine.py --port $ENG --gib 2" \
  --engine-url http://127.0.0.1:$ENG --listen 127.0.0.1:$PUB --metrics-listen 127.0.0.1:$PRIV \
  --idle-timeout 1h --min-runtime 0s > "$OUT/sidecar.log" 2>&1 &
SC=$!
for _ in $(seq 1 240); do curl -sf localhost:$PUB/ready >/dev/null && break; sleep 0.5; done
m() { curl -s localhost:$PRIV/metrics | grep -E "^gthread_sidecar_gpu_memory_(serving|residual|reserved)_bytes"; }
# held NAME LOW_GIB HIGH_GIB: the metric's value (GPU 0) must lie in [LOW, HIGH] GiB.
held() {
  v=$(curl -s localhost:$PRIV/metrics | awk -v n="gthread_sidecar_gpu_memory_$1_bytes" '$1 ~ "^"n {print $2; exit}')
  python3 -c "import sys; v=float('${v:-nan}')/2**30; ok=$2<=v<=$3; print(f'  $1 = {v:.2f} GiB, want [$2, $3]:', 'ok' if ok else 'WRONG'); sys.exit(0 if ok else 1)" || fail=1
}
echo "-- after boot (started, measured, stopped):"; m
held serving 1.9 2.6
t0=$(date +%s.%N)
curl -s localhost:$PUB/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"model":"torch-engine","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'; echo
echo "-- awake (wake took $(python3 -c "import time; print(round(time.time() - $t0, 3))") s):"; m
held serving 1.9 2.6; held reserved 1.9 2.6
nvidia-smi --query-compute-apps=pid,used_memory --format=csv
curl -s -X POST localhost:$PRIV/admin/sleep > /dev/null
echo "-- asleep:"; m
held residual 0 0.1
nvidia-smi --query-compute-apps=pid,used_memory --format=csv
kill $SC; wait $SC 2>/dev/null

echo "== 3. host-to-device bandwidth from pinned memory"
python3 - <<'PY'
import time, torch
for gib in (1, 4):
    n = gib << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    dev.copy_(host, non_blocking=True); torch.cuda.synchronize()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter(); dev.copy_(host, non_blocking=True); torch.cuda.synchronize()
        best = max(best, n / (time.perf_counter() - t))
    print(f"pinned H2D {gib} GiB: {best / 1e9:.1f} GB/s (best of 5)")
    pageable = torch.empty(n, dtype=torch.uint8)
    t = time.perf_counter(); dev.copy_(pageable); torch.cuda.synchronize()
    print(f"pageable H2D {gib} GiB: {n / (time.perf_counter() - t) / 1e9:.1f} GB/s")
PY

echo "== 4. local on a real GPU: two engines that do not fit together"
TOTAL_GIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 | awk '{printf "%d", $1 / 1024}')
HOLD=$(( TOTAL_GIB * 6 / 10 ))
cat > "$OUT/local.yaml" <<YAML
gpus: {devices: [0]}
models:
  - name: first
    spec:
      modelName: first
      engine: process
      command: [python3, scripts/device/torch_engine.py, --port, "{port}", --gib, "$HOLD", --model, first]
      gpuMemoryUtilization: "0.6"
      fairness: {minRuntime: 0s, maxWaitTime: 1s}
  - name: second
    spec:
      modelName: second
      engine: process
      command: [python3, scripts/device/torch_engine.py, --port, "{port}", --gib, "$HOLD", --model, second]
      gpuMemoryUtilization: "0.6"
      fairness: {minRuntime: 0s, maxWaitTime: 1s}
YAML
"$BIN" local --config "$OUT/local.yaml" --listen 127.0.0.1:18500 > "$OUT/local.log" 2>&1 &
LOCAL=$!
for _ in $(seq 1 240); do curl -sf localhost:18500/health >/dev/null && break; sleep 0.5; done
ask() { curl -s -o /dev/null -w '%{http_code}' localhost:18500/v1/chat/completions -H 'Content-Type: application/json' \
  -d "{\"model\":\"$1\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":1}"; }
code=$(ask first); echo "first: $code"; [ "$code" = 200 ] || fail=1
code=$(ask second); echo "second (preempts first): $code"; [ "$code" = 200 ] || fail=1
curl -s localhost:18500/api/v1/gpus > "$OUT/local-gpus.json"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits > "$OUT/local-smi.csv"
python3 - "$OUT" <<'PY' || fail=1
import json, sys
out = sys.argv[1]
gpu = json.load(open(f"{out}/local-gpus.json"))["items"][0]
states = {o["modelName"]: o["state"] for o in gpu["status"]["occupants"]}
print("occupants:", states)
held = sum(int(r.split(",")[1]) for r in open(f"{out}/local-smi.csv") if r.strip()) * 2**20
reserved = sum(o["reservedMemoryBytes"] for o in gpu["status"]["occupants"] if o["state"] == "serving")
print(f"nvidia-smi compute processes hold {held / 2**30:.2f} GiB; the ledger reserves {reserved / 2**30:.2f} GiB for the serving one")
ok = states.get("second") == "serving" and states.get("first") == "sleeping" and abs(held - reserved) <= 0.05 * held
sys.exit(0 if ok else 1)
PY
kill -INT $LOCAL; wait $LOCAL 2>/dev/null
echo "== gpu-check: $([ $fail = 0 ] && echo PASS || echo FAIL)"
exit $fail
