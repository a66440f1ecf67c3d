#!/usr/bin/env bash
# Renders every Kubernetes overlay under deploy/k8s/overlays with kustomize and validates the
# output offline: against the Kubernetes JSON schemas (kubernetes-validate, which ships them,
# strict mode: unknown fields fail) and against the platform's own rules
# (scripts/k8s_checks.py: every service has its Service, autoscaler, disruption budget,
# NetworkPolicy, gRPC probes, resources and a non-root security context).
#
# Needs `kubectl` (its built-in kustomize) or `kustomize`, and Python 3; kubernetes-validate
# is installed from PyPI into <target>/k8s-venv on first use. Without kubectl or kustomize
# only the plain manifests are schema-checked, with a warning.
# Environment: K8S_VERSION (default 1.30.0), CARGO_TARGET_DIR (default target/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "validate-k8s: $*" >&2; }
k8s_version=${K8S_VERSION:-1.30.0}
target_dir=${CARGO_TARGET_DIR:-target}
venv=$target_dir/k8s-venv

render=yes
if command -v kubectl >/dev/null 2>&1; then
  render() { kubectl kustomize "$1"; }
elif command -v kustomize >/dev/null 2>&1; then
  render() { kustomize build "$1"; }
else
  render=
fi

if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  say "installing kubernetes-validate into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0'
fi

if [ -z "$render" ]; then
  # Without kustomize the overlays cannot be rendered; still check every plain manifest
  # against the schemas, and say loudly what was skipped.
  say "WARNING: neither kubectl nor kustomize is on PATH: overlays NOT rendered; validating the"
  say "plain manifests only (install kubectl to run the full check)"
  files=$(ls deploy/k8s/base/*.yaml deploy/k8s/overlays/*/*.yaml | grep -v kustomization.yaml)
  # shellcheck disable=SC2086
  exec "$venv/bin/kubernetes-validate" --strict --quiet -k "$k8s_version" $files
fi

out=$(mktemp -d -t clientele-k8s-XXXXXX)
trap 'rm -rf "$out"' EXIT
status=0
for overlay in deploy/k8s/overlays/*/; do
  name=$(basename "$overlay")
  render "$overlay" > "$out/$name.yaml"
  objects=$(grep -c '^kind:' "$out/$name.yaml" || true)
  if "$venv/bin/kubernetes-validate" --strict --quiet -k "$k8s_version" "$out/$name.yaml" \
     && "$venv/bin/python" scripts/k8s_checks.py "$name" "$out/$name.yaml"; then
    say "$name: $objects objects render and validate against Kubernetes $k8s_version"
  else
    say "$name: FAILED"
    status=1
  fi
done
exit $status
