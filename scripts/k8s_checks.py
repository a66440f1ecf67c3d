"""The platform's own rules for a rendered Kubernetes overlay (schema validity is checked
separately by kubernetes-validate). Usage: k8s_checks.py <overlay-name> <rendered.yaml>.

Every Clientele Deployment must have: a Service, a HorizontalPodAutoscaler and a
PodDisruptionBudget of the same name that select/target it; a NetworkPolicy selecting its
pods; native gRPC liveness and readiness probes on the gRPC port; CPU and memory requests and
a memory limit; a non-root, read-only, capability-free container; secrets only through
secretKeyRef to a Secret the overlay defines or documents. Exits 1 listing every violation."""
import sys

import yaml

SERVICES = ["ingest", "profiles", "segmentation", "offers", "experiments"]


def main() -> int:
    overlay, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    errors: list[str] = []
    deployments = by_kind.get("Deployment", {})
    secrets = by_kind.get("Secret", {})
    policies = list(by_kind.get("NetworkPolicy", {}).values())
    for svc in SERVICES:
        name = f"clientele-{svc}"
        dep = deployments.get(name)
        if dep is None:
            errors.append(f"{name}: no Deployment")
            continue
        labels = dep["spec"]["template"]["metadata"]["labels"]
        selector = dep["spec"]["selector"]["matchLabels"]
        if any(labels.get(k) != v for k, v in selector.items()):
            errors.append(f"{name}: selector does not match the pod labels")
        service = by_kind.get("Service", {}).get(name)
        if service is None or any(labels.get(k) != v for k, v in service["spec"]["selector"].items()):
            errors.append(f"{name}: no Service selecting its pods")
        hpa = by_kind.get("HorizontalPodAutoscaler", {}).get(name)
        if hpa is None or hpa["spec"]["scaleTargetRef"]["name"] != name:
            errors.append(f"{name}: no HorizontalPodAutoscaler targeting it")
        elif hpa["spec"]["minReplicas"] > hpa["spec"]["maxReplicas"]:
            errors.append(f"{name}: autoscaler minReplicas > maxReplicas")
        pdb = by_kind.get("PodDisruptionBudget", {}).get(name)
        if pdb is None or any(labels.get(k) != v for k, v in pdb["spec"]["selector"]["matchLabels"].items()):
            errors.append(f"{name}: no PodDisruptionBudget selecting its pods")
        elif "minAvailable" in pdb["spec"] and hpa and pdb["spec"]["minAvailable"] >= hpa["spec"]["minReplicas"]:
            errors.append(f"{name}: PodDisruptionBudget minAvailable blocks every eviction")
        if not any(
            all(labels.get(k) == v for k, v in p["spec"]["podSelector"].get("matchLabels", {}).items())
            and p["spec"]["podSelector"].get("matchLabels")
            for p in policies
        ):
            errors.append(f"{name}: no NetworkPolicy selecting its pods")
        spec = dep["spec"]["template"]["spec"]
        if not spec.get("securityContext", {}).get("runAsNonRoot"):
            errors.append(f"{name}: pod does not set runAsNonRoot")
        for c in spec["containers"]:
            where = f"{name}/{c['name']}"
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe"):
                grpc = c.get(probe, {}).get("grpc")
                if not grpc or grpc.get("port") != ports.get("grpc"):
                    errors.append(f"{where}: {probe} is not a gRPC probe on the grpc port")
            res = c.get("resources", {})
            if not {"cpu", "memory"} <= set(res.get("requests", {})) or "memory" not in res.get("limits", {}):
                errors.append(f"{where}: needs cpu+memory requests and a memory limit")
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False or not sc.get("readOnlyRootFilesystem") \
                    or sc.get("capabilities", {}).get("drop") != ["ALL"]:
                errors.append(f"{where}: container securityContext is not locked down")
            args = c.get("args", [])
            if args[:2] != ["--target", svc]:
                errors.append(f"{where}: runs {args}, expected --target {svc}")
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and secrets and ref["name"] not in secrets:
                    errors.append(f"{where}: env {env['name']} refers to missing Secret {ref['name']}")
    if "clientele-migrate" not in by_kind.get("Job", {}):
        errors.append("no migration Job clientele-migrate")
    for e in errors:
        print(f"{overlay}: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
