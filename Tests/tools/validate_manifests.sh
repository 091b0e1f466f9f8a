#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests in deploy/kubernetes (no cluster, no network once
# the PyPI package is installed):
#
#   1. Each manifest file on its own, with kubernetes-validate (PyPI; it bundles the Kubernetes
#      JSON schemas) against one Kubernetes version, in strict mode: an unknown field fails. A
#      resource whose kind has no schema (a misspelt kind, an apiVersion the version lacks) only
#      makes kubernetes-validate warn; here it fails too.
#   2. The kustomization rendered (`kubectl kustomize`, or a standalone `kustomize build`),
#      validated the same way. Without either tool this step is skipped, and says so.
#   3. Cross-references the schemas cannot see, on the rendered objects: the ConfigMap and Secret
#      the pods use exist (Secret: in secret.example.yaml), every {env: NAME} of the Sluice config
#      is a key of that Secret, named ports used by probes and Services exist, selectors match
#      the pod labels, the Prometheus port annotation is a container port, and the Sluice config
#      in the ConfigMap is what sluice.yaml says.
#   4. If a built `router` is found ($SLUICE_ROUTER, .build/release/router or .build/debug/router),
#      `router --check` on the config, with placeholder values for its {env: NAME} secrets.
#
# Usage: Tests/tools/validate_manifests.sh [MANIFEST_DIR]   (default: deploy/kubernetes)
# Environment: K8S_VERSION (default 1.30.0), VERBOSE=1 (list every cross-reference check). Exits non-zero on any failure and prints what failed.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dir="$(realpath "${1:-$repo/deploy/kubernetes}")"
k8s_version="${K8S_VERSION:-1.30.0}"
failures=0
fail() { printf 'FAIL: %s\n' "$*"; failures=$((failures + 1)); }
ok() { printf 'ok:   %s\n' "$*"; }
indent() { sed 's/^/      /'; }

[ -d "$dir" ] || { echo "no directory $dir"; exit 2; }

if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
    echo "installing kubernetes-validate (PyPI)…"
    python3 -m pip install -q kubernetes-validate 2>/dev/null ||
        python3 -m pip install -q --break-system-packages kubernetes-validate ||
        { echo "FAIL: cannot install kubernetes-validate"; exit 2; }
fi
echo "kubernetes-validate $(python3 -m kubernetes_validate --version 2>/dev/null | awk '{print $NF}'), Kubernetes $k8s_version, strict"

# kubernetes-validate FILE LABEL: fails on a non-zero exit or any WARN/ERROR line.
validate() {
    local file="$1" label="$2" out rc
    out="$(python3 -m kubernetes_validate --kubernetes-version "$k8s_version" --strict "$file" 2>&1)"
    rc=$?
    if [ $rc -ne 0 ] || grep -qE '^(WARN|ERROR|CRITICAL)' <<<"$out"; then
        fail "$label"
        grep -vE '^INFO' <<<"$out" | sed "s|$dir/||g" | indent
    elif ! grep -q '^INFO .* passed ' <<<"$out"; then
        fail "$label: no resource found"
    else
        ok "$label ($(grep -c '^INFO .* passed ' <<<"$out") resource(s))"
    fi
}

# 1. Each manifest file: YAML files with a top-level kind, except the kustomization itself.
found=0
for f in "$dir"/*.yaml "$dir"/*.yml; do
    [ -e "$f" ] || continue
    grep -qE '^kind:' "$f" || continue           # not a Kubernetes object (e.g. the Sluice config)
    grep -qE '^kind: *Kustomization *$' "$f" && continue
    found=$((found + 1))
    validate "$f" "$(basename "$f")"
done
[ $found -gt 0 ] || fail "no manifests in $dir"

# 2. The rendered kustomization.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rendered=""
if [ -e "$dir/kustomization.yaml" ]; then
    if command -v kubectl >/dev/null; then render=(kubectl kustomize "$dir")
    elif command -v kustomize >/dev/null; then render=(kustomize build "$dir")
    else render=()
    fi
    if [ ${#render[@]} -eq 0 ]; then
        echo "skip: no kubectl or kustomize on PATH, so the kustomization is not rendered (files were validated one by one)"
    elif "${render[@]}" >"$work/rendered.yaml" 2>"$work/render.err" && [ ! -s "$work/render.err" ]; then
        ok "${render[*]/$dir/$(basename "$dir")} rendered $(grep -c '^kind:' "$work/rendered.yaml") object(s)"
        rendered="$work/rendered.yaml"
        validate "$rendered" "rendered kustomization"
    else
        fail "${render[*]} (the kustomization does not render cleanly)"
        indent <"$work/render.err"
    fi
else
    echo "skip: no kustomization.yaml in $dir"
fi

# 3. Cross-references, on the rendered objects (or the files, when nothing was rendered).
ENV_NAMES_FILE="$work/env-names" python3 - "$dir" "${rendered:-}" >"$work/refs.out" 2>&1 <<'PY'
import glob, os, re, sys
import yaml

d, rendered = sys.argv[1], sys.argv[2]
problems, checks = [], []
def check(cond, what):
    (checks if cond else problems).append(what)

def load(path):
    with open(path) as f:
        return [o for o in yaml.safe_load_all(f) if isinstance(o, dict)]

if rendered:
    objects = load(rendered)
else:
    objects = [o for p in sorted(glob.glob(os.path.join(d, "*.yaml")))
               if os.path.basename(p) not in ("kustomization.yaml", "secret.example.yaml")
               for o in load(p) if "kind" in o and o.get("kind") != "Kustomization"]
    # What kustomize would have generated: ConfigMaps from configMapGenerator files.
    k = os.path.join(d, "kustomization.yaml")
    for g in (load(k)[0].get("configMapGenerator", []) if os.path.exists(k) else []):
        data = {}
        for entry in g.get("files", []):
            key, _, path = entry.rpartition("=") if "=" in entry else (os.path.basename(entry), "", entry)
            if os.path.exists(os.path.join(d, path)):
                data[key] = open(os.path.join(d, path)).read()
        objects.append({"kind": "ConfigMap", "metadata": {"name": g["name"]}, "data": data})
k = os.path.join(d, "kustomization.yaml")
if os.path.exists(k):
    listed = load(k)[0].get("resources", [])
    for r in listed:
        check(os.path.exists(os.path.join(d, r)), f"kustomization.yaml: resource {r} exists")
    for p in sorted(glob.glob(os.path.join(d, "*.yaml"))):
        b = os.path.basename(p)
        if b in ("kustomization.yaml", "secret.example.yaml") or not any("kind" in o for o in load(p)):
            continue
        check(b in listed, f"kustomization.yaml lists {b}")
by_kind = {}
for o in objects:
    by_kind.setdefault(o["kind"], []).append(o)

secret_keys = {}
ex = os.path.join(d, "secret.example.yaml")
if os.path.exists(ex):
    for o in load(ex):
        if o.get("kind") == "Secret":
            secret_keys[o["metadata"]["name"]] = set((o.get("stringData") or {}).keys()) | set((o.get("data") or {}).keys())

config_text, env_names = None, set()
def env_refs(node):  # the NAMEs of {env: NAME} secrets anywhere in the Sluice config
    if isinstance(node, dict):
        if set(node) == {"env"} and isinstance(node["env"], str):
            yield node["env"]
        for v in node.values():
            yield from env_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from env_refs(v)
if os.path.exists(os.path.join(d, "sluice.yaml")):
    config_text = open(os.path.join(d, "sluice.yaml")).read()
    env_names = set(env_refs(yaml.safe_load(config_text)))
with open(os.environ["ENV_NAMES_FILE"], "w") as f:
    f.write("".join(n + "\n" for n in sorted(env_names)))

configmaps = {o["metadata"]["name"]: o for o in by_kind.get("ConfigMap", [])}
workloads = by_kind.get("StatefulSet", []) + by_kind.get("Deployment", [])
check(workloads, "a StatefulSet or Deployment exists")
for w in workloads:
    name = f'{w["kind"]}/{w["metadata"]["name"]}'
    tpl = w["spec"]["template"]
    spec = tpl["spec"]
    labels = tpl["metadata"].get("labels", {})
    sel = w["spec"]["selector"].get("matchLabels", {})
    check(all(labels.get(k) == v for k, v in sel.items()), f"{name}: selector matches the pod labels")
    ports = {}
    for c in spec["containers"]:
        for p in c.get("ports", []):
            if "name" in p:
                check(p["name"] not in ports, f"{name}: port name {p['name']} is unique in the pod")
                ports[p["name"]] = p["containerPort"]
    numbers = set(ports.values())
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    claims = {c["metadata"]["name"] for c in w["spec"].get("volumeClaimTemplates", [])}
    ann = tpl["metadata"].get("annotations", {})
    if "prometheus.io/port" in ann:
        check(int(ann["prometheus.io/port"]) in numbers, f"{name}: prometheus.io/port {ann['prometheus.io/port']} is a container port")
    for v in volumes.values():
        if "configMap" in v:
            cm = v["configMap"]["name"]
            check(cm in configmaps, f"{name}: volume {v['name']} uses ConfigMap {cm}, which the manifests define")
            if cm in configmaps and config_text is not None and "sluice.yaml" in configmaps[cm].get("data", {}):
                check(configmaps[cm]["data"]["sluice.yaml"] == config_text, f"ConfigMap {cm}: sluice.yaml is the file sluice.yaml")
    for c in spec["containers"]:
        cn = f"{name} container {c['name']}"
        for m in c.get("volumeMounts", []):
            check(m["name"] in volumes or m["name"] in claims, f"{cn}: mount {m['name']} is a volume or volume claim")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = (c.get(probe) or {}).get("httpGet", {}).get("port")
            if isinstance(port, str):
                check(port in ports, f"{cn}: {probe} port {port} is a named container port")
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                s = e["secretRef"]["name"]
                check(s in secret_keys, f"{cn}: Secret {s} is described in secret.example.yaml")
                if s in secret_keys:
                    missing = sorted(env_names - secret_keys[s])
                    check(not missing, f"{cn}: every {{env: NAME}} of sluice.yaml is a key of Secret {s}" + (f" (missing: {', '.join(missing)})" if missing else ""))
        args = " ".join(c.get("command", []) + c.get("args", []))
        check("--run-dir=" in args or "--run-dir " in args, f"{cn}: has --run-dir")
    run_dirs = {re.search(r"--run-dir[= ](\S+)", " ".join(c.get("args", []))).group(1)
                for c in spec["containers"] if re.search(r"--run-dir[= ](\S+)", " ".join(c.get("args", [])))}
    check(len(run_dirs) == 1, f"{name}: all containers share one --run-dir ({', '.join(sorted(run_dirs))})")
    for svc in by_kind.get("Service", []):
        sn = f"Service/{svc['metadata']['name']}"
        ssel = svc["spec"].get("selector", {})
        if not all(labels.get(k) == v for k, v in ssel.items()):
            continue
        for p in svc["spec"].get("ports", []):
            tp = p.get("targetPort", p["port"])
            check(tp in ports if isinstance(tp, str) else tp in numbers, f"{sn}: targetPort {tp} is a port of {name}")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        psel = pdb["spec"]["selector"].get("matchLabels", {})
        check(all(labels.get(k) == v for k, v in psel.items()), f"PodDisruptionBudget/{pdb['metadata']['name']}: selector matches {name}'s pods")
    if w["kind"] == "StatefulSet":
        svcs = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
        gov = w["spec"].get("serviceName")
        check(gov in svcs and svcs[gov]["spec"].get("clusterIP") == "None", f"{name}: serviceName {gov} is a headless Service")

if os.environ.get("VERBOSE"):
    for c in checks:
        print("ok:   " + c)
else:
    print(f"ok:   {len(checks)} cross-reference checks passed (VERBOSE=1 lists them)")
for p in problems:
    print("FAIL: " + p)
sys.exit(1 if problems else 0)
PY
rc=$?
cat "$work/refs.out"
[ $rc -eq 0 ] || failures=$((failures + $(grep -c '^FAIL' "$work/refs.out" || echo 1)))

# 4. The Sluice config, with a built router if there is one.
router="${SLUICE_ROUTER:-}"
for candidate in "$repo/.build/release/router" "$repo/.build/debug/router"; do
    [ -n "$router" ] || { [ -x "$candidate" ] && router="$candidate"; }
done
if [ ! -e "$dir/sluice.yaml" ]; then
    echo "skip: no sluice.yaml in $dir"
elif [ -z "$router" ]; then
    echo "skip: no built router (set SLUICE_ROUTER or build), so sluice.yaml is not checked by 'router --check'"
else
    env_args=()
    for name in $(cat "$work/env-names" 2>/dev/null); do
        env_args+=("$name=placeholder")
    done
    if out="$(env "${env_args[@]}" "$router" --check --config "$dir/sluice.yaml" 2>&1)"; then
        ok "router --check sluice.yaml ($(grep -E '^(tenants|destinations):' <<<"$out" | tr '\n' ' '))"
    else
        fail "router --check sluice.yaml"
        indent <<<"$out"
    fi
fi

if [ $failures -gt 0 ]; then
    echo "$failures check(s) failed"
    exit 1
fi
echo "all manifest checks passed"
