#!/usr/bin/env bash
# Validates the manifests in this folder offline against the Kubernetes
# schemas (PyPI's kubernetes-validate bundles them: nothing is fetched but
# the package itself), strictly, so an unknown or misspelt field fails too;
# then checks the one rule the schemas cannot: the pod's grace period
# outlasts corral's own stop (--drain-delay + --shutdown-timeout).
# Usage: deploy/k8s/validate.sh [MANIFEST...]   (default: every *.yaml here)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${CORRAL_K8S_VENV:-${TMPDIR:-/tmp}/corral-k8s-validate}"

if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian ships venv separately.
    apt-get update -qq && apt-get install -y -qq python3-venv
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check 'kubernetes-validate==1.37.0'
fi

if [ "$#" -eq 0 ]; then
  set -- "$here"/*.yaml
fi
"$venv/bin/kubernetes-validate" --strict --quiet "$@"

"$venv/bin/python" - "$@" <<'PY'
import re
import sys

import yaml

def seconds(text):
    match = re.fullmatch(r"(\d+)(ms|s|m)", text)
    if not match:
        sys.exit(f"cannot read the duration {text!r}: write e.g. 10s")
    number, unit = int(match.group(1)), match.group(2)
    return number * {"ms": 0.001, "s": 1, "m": 60}[unit]

failed = False
for path in sys.argv[1:]:
    with open(path) as file:
        documents = [d for d in yaml.safe_load_all(file) if d]
    for doc in documents:
        if doc.get("kind") != "Deployment":
            continue
        spec = doc["spec"]["template"]["spec"]
        grace = spec.get("terminationGracePeriodSeconds", 30)
        for container in spec["containers"]:
            flags = dict(
                arg[2:].split("=", 1)
                for arg in container.get("args", [])
                if arg.startswith("--") and "=" in arg
            )
            stop = seconds(flags.get("drain-delay", "0s")) + seconds(
                flags.get("shutdown-timeout", "30s")
            )
            if grace <= stop:
                failed = True
                print(
                    f"ERROR {path}: deployment/{doc['metadata']['name']} container "
                    f"{container['name']}: terminationGracePeriodSeconds {grace} must exceed "
                    f"--drain-delay + --shutdown-timeout ({stop:g}s), or the kubelet kills "
                    f"the pod before it drained; raise the grace period"
                )
sys.exit(1 if failed else 0)
PY
echo "k8s manifests valid: $*"
