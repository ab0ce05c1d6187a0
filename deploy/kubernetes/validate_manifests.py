"""Validate rendered Kubernetes manifests offline; run by validate.sh in its tools venv.

    python validate_manifests.py --versions 1.30.0 1.37.0 -- rendered/*.yaml

Every object of a built-in kind is validated strictly (unknown fields are errors) against
the OpenAPI-derived JSON schemas that ship inside the kubernetes-validate package, for each
version given. Custom resources have no schema there: the kinds in ``CUSTOM_KINDS`` are
skipped by name and only checked for shape (apiVersion group, name, namespace, spec; a
PrometheusRule's groups and rules too: deploy/observability/check_rules.sh runs promtool on
them). Any
other kind without a schema is an error, so a typo in a built-in kind's apiVersion cannot
slip through as "custom".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

#: Custom resources the manifests use: (API group, kind) -> namespaced?
CUSTOM_KINDS: dict[tuple[str, str], bool] = {
    ("gateway.networking.k8s.io", "GatewayClass"): False,
    ("gateway.networking.k8s.io", "Gateway"): True,
    ("gateway.networking.k8s.io", "HTTPRoute"): True,
    ("gateway.networking.k8s.io", "ReferenceGrant"): True,
    ("gateway.envoyproxy.io", "ClientTrafficPolicy"): True,
    ("gateway.envoyproxy.io", "BackendTrafficPolicy"): True,
    ("monitoring.coreos.com", "ServiceMonitor"): True,
    ("monitoring.coreos.com", "PrometheusRule"): True,
}

#: The fields of a rule in a PrometheusRule (the Prometheus Operator's Rule type).
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def _name(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {ns}{meta.get('name')}"


def check_custom(obj: dict, namespaced: bool) -> list[str]:
    errors = []
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        errors.append("metadata.name is missing")
        meta = {}
    if namespaced and not meta.get("namespace"):
        errors.append("a namespaced custom resource without metadata.namespace")
    if not namespaced and meta.get("namespace"):
        errors.append("a cluster-scoped resource with metadata.namespace")
    if not isinstance(obj.get("spec"), dict) or not obj["spec"]:
        errors.append("spec is missing or empty")
    elif obj.get("kind") == "PrometheusRule":
        errors += check_rule_groups(obj["spec"])
    return errors


def check_rule_groups(spec: dict) -> list[str]:
    """A PrometheusRule's ``spec``: named groups of rules, each an alert or a record."""
    groups = spec.get("groups")
    if not isinstance(groups, list) or not groups:
        return ["spec.groups is missing or empty"]
    errors = []
    for i, group in enumerate(groups):
        rules = group.get("rules") if isinstance(group, dict) else None
        if not isinstance(group, dict) or not group.get("name") or not rules:
            errors.append(f"spec.groups[{i}] needs a name and rules")
            continue
        for j, rule in enumerate(rules):
            where = f"spec.groups[{i}].rules[{j}]"
            if not isinstance(rule, dict) or not rule.get("expr"):
                errors.append(f"{where}: no expr")
            elif ("alert" in rule) == ("record" in rule):
                errors.append(f"{where}: needs exactly one of alert or record")
            elif unknown := set(rule) - RULE_FIELDS:
                errors.append(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    return errors


def validate_file(path: Path, versions: list[str]) -> tuple[int, int, int, list[str]]:
    """(objects, schema-valid objects, custom resources, errors) of one rendered file."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        return 0, 0, 0, [f"{path.name}: not valid YAML: {exc}"]
    if not docs:
        return 0, 0, 0, [f"{path.name}: renders no object"]
    validated = custom = 0
    errors: list[str] = []
    for obj in docs:
        if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
            errors.append(f"{path.name}: an object without apiVersion/kind")
            continue
        group = obj["apiVersion"].rpartition("/")[0]
        key = (group, obj["kind"])
        if key in CUSTOM_KINDS:
            custom += 1
            problems = check_custom(obj, CUSTOM_KINDS[key])
            errors += [f"{path.name}: {_name(obj)}: {e}" for e in problems]
            continue
        before = len(errors)
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except SchemaNotFoundError:
                errors.append(f"{path.name}: {_name(obj)}: no Kubernetes {version} schema for "
                              f"{obj['apiVersion']} {obj['kind']} (a custom resource? list it "
                              "in CUSTOM_KINDS)")
                break
            except kubernetes_validate.ValidationError as exc:
                # The first error only (jsonschema's best match); fix it and run again.
                where = "/".join(str(p) for p in exc.path) or "(top)"
                errors.append(f"{path.name}: {_name(obj)}: Kubernetes {version}: {where}: "
                              f"{exc.message}")
        if len(errors) == before:
            validated += 1
    return len(docs), validated, custom, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", nargs="+", required=True)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    total = total_valid = total_custom = 0
    all_errors: list[str] = []
    for path in args.files:
        objects, validated, custom, errors = validate_file(path, args.versions)
        total += objects
        total_valid += validated
        total_custom += custom
        all_errors += errors
        status = "ok" if not errors else f"{len(errors)} error(s)"
        print(f"validate: {path.stem}: {objects} object(s), {validated} schema-valid"
              + (f", {custom} custom resource(s) shape-checked" if custom else "")
              + f": {status}")
    for error in all_errors:
        print(f"validate: ERROR {error}", file=sys.stderr)
    versions = ", ".join(args.versions)
    print(f"validate: {len(args.files)} kustomizations, {total} objects: "
          f"{total_valid} valid against Kubernetes {versions} (strict), {total_custom} custom "
          f"resources shape-checked; {len(all_errors)} error(s)")
    return 1 if all_errors else 0


if __name__ == "__main__":
    sys.exit(main())
