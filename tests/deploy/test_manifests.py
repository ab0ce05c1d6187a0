"""The container image and Kubernetes manifests under deploy/: rendered, validated, checked.

``deploy/kubernetes/validate.sh`` renders every kustomization offline and validates it
against the Kubernetes schemas; these tests run it once, then check what matters for
routeyard on the rendered YAML: probes, hot-reloadable routes volume, security context,
replicas, graceful termination, that every routes.yaml validates with routeyard's own
loader, and that routes, vLLM examples and gateway routes agree with each other.

The tests never install anything: they run validate.sh with ``--no-install``. Outside CI
(``CI`` is not ``true``) the module is skipped when its tools are not installed yet
(``bash deploy/kubernetes/validate.sh`` installs them); in CI a missing tool fails, and
``.ci/run`` runs validate.sh, which installs what is missing, before the test command.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import subprocess
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from ruamel.yaml import YAML

from router.batch.config import BatchConfig
from router.catalog import PROXIED
from router.config import RoutesFile, parse
from router.tenants.config import hash_key

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
VALIDATE = K8S / "validate.sh"
IN_CI = os.environ.get("CI") == "true"

#: Renders holding a routeyard Deployment, and the fewest replicas each must keep.
ROUTERS = {
    "base": 2,
    "overlays_dev": 1,
    "examples_vllm_routeyard": 2,
    "overlays_production": 3,
}
ROUTER_LABELS = {"app.kubernetes.io/name": "routeyard", "app.kubernetes.io/component": "router"}
MODEL_KINDS = {"chat", "embedding", "rerank", "score", "transcription"}
_yaml = YAML(typ="safe")


# --- rendering -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("rendered")
    args = ["bash", str(VALIDATE), "--out", str(out), "--no-install"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    if proc.returncode == 3:
        missing = "validate.sh's tools are not installed; run `bash deploy/kubernetes/" \
                  "validate.sh` once (.ci/run does, before the tests)"
        if IN_CI:
            pytest.fail(f"{missing}: required under CI=true\n{proc.stderr}")
        pytest.skip(missing)
    assert proc.returncode == 0, f"validate.sh failed:\n{proc.stdout}\n{proc.stderr}"
    assert "; 0 error(s)" in proc.stdout.splitlines()[-1], proc.stdout
    return {p.stem: [d for d in _yaml.load_all(p.read_text()) if d] for p in out.glob("*.yaml")}


def kustomizations() -> tuple[list[Path], list[Path]]:
    """(kustomizations that render, Components) under deploy/kubernetes."""
    plain, components = [], []
    for k in sorted(K8S.rglob("kustomization.yaml")):
        (components if _yaml.load(k.read_text()).get("kind") == "Component" else plain).append(
            k.parent)
    return plain, components


def render_name(directory: Path) -> str:
    return str(directory.relative_to(K8S)).replace("/", "_")


def objects(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind
            and (name is None or fnmatch(o["metadata"]["name"], name))]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = objects(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert match, duration
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match[2]]


class Router:
    """The routeyard Deployment of one render, with its effective environment."""

    def __init__(self, objs: list[dict]) -> None:
        self.objs = objs
        self.deployment = one(objs, "Deployment", "routeyard")
        self.pod = self.deployment["spec"]["template"]
        self.spec = self.pod["spec"]
        (self.container,) = [c for c in self.spec["containers"] if c["name"] == "routeyard"]
        self.env: dict[str, str] = {}
        for source in self.container.get("envFrom", []):
            if "configMapRef" in source:
                cm = one(objs, "ConfigMap", source["configMapRef"]["name"])
                self.env.update(cm["data"])
        for var in self.container.get("env", []):
            if "value" in var:
                self.env[var["name"]] = var["value"]
        self.mounts = {m["name"]: m for m in self.container["volumeMounts"]}
        self.volumes = {v["name"]: v for v in self.spec["volumes"]}
        self.port = next(p["containerPort"] for p in self.container["ports"]
                         if p["name"] == "http")

    def routes_text(self) -> str:
        cm = one(self.objs, "ConfigMap", self.volumes["routes"]["configMap"]["name"])
        return cm["data"]["routes.yaml"]


def routes_tree(objs: list[dict]) -> dict:
    return _yaml.load(Router(objs).routes_text())


# --- validate.sh -----------------------------------------------------------------------

def test_every_kustomization_is_rendered_and_every_component_used(rendered) -> None:
    plain, components = kustomizations()
    assert {render_name(d) for d in plain} == set(rendered)
    assert set(ROUTERS) <= set(rendered)
    used = set()
    for d in plain + components:
        for ref in _yaml.load((d / "kustomization.yaml").read_text()).get("components", []):
            used.add((d / ref).resolve())
    assert {c.resolve() for c in components} <= used, "a Component no overlay includes"


# --- the routeyard Deployment ----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_probes_routes_volume_and_security(rendered, name: str) -> None:
    r = Router(rendered[name])
    env = r.env
    assert env["ROUTEYARD_HOST"] == "0.0.0.0"
    assert int(env["ROUTEYARD_PORT"]) == r.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = r.container[probe]["httpGet"]
        # Readiness is /ready?models=none (deployment.yaml, docs/deployment.md): plain
        # /ready turns 503 when any model lacks a backend, which would empty the Service.
        expected = "/ready?models=none" if probe == "readinessProbe" else "/health"
        assert get["path"] == expected, probe
        assert get["port"] in ("http", r.port), probe

    # routes.yaml: the whole ConfigMap directory (hot reload), never a subPath.
    assert all("subPath" not in m and "subPathExpr" not in m for m in r.mounts.values())
    routes = r.mounts["routes"]
    assert r.volumes["routes"]["configMap"]["name"] == "routeyard-routes"
    assert env["ROUTEYARD_CONFIG"] == routes["mountPath"] + "/routes.yaml"
    assert routes.get("readOnly") is True
    assert "routes.yaml" in one(rendered[name], "ConfigMap", "routeyard-routes")["data"]

    pod_sc, sc = r.spec["securityContext"], r.container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
    assert sc["runAsUser"] != 0 and pod_sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert r.spec["enableServiceLinks"] is False  # else ROUTEYARD_PORT=tcp://... is injected
    assert r.spec["automountServiceAccountToken"] is False
    assert not any("hostPath" in v for v in r.volumes.values())

    # Every directory routeyard writes to is an emptyDir.
    writable = {m["mountPath"] for n, m in r.mounts.items() if "emptyDir" in r.volumes[n]}
    for path in (env["TMPDIR"], env["PROMETHEUS_MULTIPROC_DIR"], "/var/lib/routeyard"):
        assert any(path == w or path.startswith(w + "/") for w in writable), path

    res = r.container["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"]


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_replicas_and_graceful_termination(rendered, name: str) -> None:
    r = Router(rendered[name])
    hpas = [h for h in objects(rendered[name], "HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"]["name"] == "routeyard"]
    if hpas:
        # The autoscaler owns the count: a replicas field would reset it on every apply.
        assert "replicas" not in r.deployment["spec"]
        replicas = hpas[0]["spec"]["minReplicas"]
    else:
        replicas = r.deployment["spec"]["replicas"]
    assert replicas >= ROUTERS[name]

    sleep = r.container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    grace = r.spec["terminationGracePeriodSeconds"]
    assert grace > float(r.env["ROUTEYARD_GRACEFUL_SHUTDOWN"]) + float(sleep[1])
    assert r.deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_service_pdb_spread_and_scraping(rendered, name: str) -> None:
    objs = rendered[name]
    r = Router(objs)
    labels = r.pod["metadata"]["labels"]
    assert selects(ROUTER_LABELS, labels)
    assert r.deployment["spec"]["selector"]["matchLabels"] == ROUTER_LABELS
    service = one(objs, "Service", "routeyard")
    assert selects(service["spec"]["selector"], labels)
    assert service["spec"]["ports"][0]["targetPort"] in ("http", r.port)
    assert selects(one(objs, "PodDisruptionBudget", "routeyard")["spec"]["selector"]
                   ["matchLabels"], labels)
    spread = r.spec["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname",
                                                  "topology.kubernetes.io/zone"}
    assert all(selects(c["labelSelector"]["matchLabels"], labels) for c in spread)

    notes = r.pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == r.port
    assert notes["prometheus.io/path"] == "/metrics"
    for monitor in objects(objs, "ServiceMonitor"):
        assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert r.env["OTEL_SERVICE_NAME"] == "routeyard"
    assert r.env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http")

    if name != "base":  # overlays name a real image and a namespace that enforces "restricted"
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", r.container["image"])
        namespace = r.deployment["metadata"]["namespace"]
        ns = one(objs, "Namespace", namespace)
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_restricted_namespaces_hold_only_restricted_pods(rendered) -> None:
    """Pod Security "restricted" would refuse these pods at admission: check them here."""
    checked = 0
    for objs in rendered.values():
        restricted = {n["metadata"]["name"] for n in objects(objs, "Namespace")
                      if n["metadata"].get("labels", {}).get(
                          "pod-security.kubernetes.io/enforce") == "restricted"}
        for d in objects(objs, "Deployment"):
            if d["metadata"].get("namespace") not in restricted:
                continue
            spec = d["spec"]["template"]["spec"]
            pod_sc = spec.get("securityContext", {})
            assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
            assert not any("hostPath" in v for v in spec.get("volumes", []))
            for c in spec["containers"]:
                sc = c.get("securityContext", {})
                name = f"{d['metadata']['name']}/{c['name']}"
                assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, name
                assert sc.get("allowPrivilegeEscalation") is False, name
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
                seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
                assert seccomp.get("type") == "RuntimeDefault", name
                checked += 1
    assert checked >= 6  # the routers and the dev overlay's fake engines


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_metrics_are_scraped_with_the_admin_key_under_auth(rendered, name: str) -> None:
    """With ``auth:``, ``/metrics`` needs an admin key unless ``auth.public_metrics``: a
    ServiceMonitor sends the admin key from the very Secret file the router reads it from,
    and a render scraped only by the pod annotations (no key) opens ``/metrics``."""
    objs = rendered[name]
    r = Router(objs)
    auth = routes_tree(objs).get("auth")
    if auth is None or auth.get("public_metrics") is True:
        return
    monitors = objects(objs, "ServiceMonitor")
    assert monitors, f"{name}: auth is on and nothing can scrape /metrics without a key"
    keys_dir = r.mounts["keys"]["mountPath"] + "/"
    admin_files = {k["key_file"].removeprefix(keys_dir) for k in auth.get("admin_keys", [])
                   if k.get("key_file", "").startswith(keys_dir)}
    for monitor in monitors:
        for endpoint in monitor["spec"]["endpoints"]:
            authorization = endpoint["authorization"]
            assert authorization["type"] == "Bearer"
            credentials = authorization["credentials"]
            assert credentials["name"] == r.volumes["keys"]["secret"]["secretName"]
            assert credentials["key"] in admin_files


def test_production_extras(rendered) -> None:
    objs = rendered["overlays_production"]
    r = Router(objs)
    assert r.env["OTEL_TRACES_EXPORTER"] == "otlp"
    assert {"secretRef": {"name": "routeyard-secrets"}} in r.container["envFrom"]
    assert r.volumes["keys"]["secret"]["optional"] is False
    assert one(objs, "ServiceMonitor", "routeyard")
    # deploy/observability, as a Component: the alerts and the dashboard, unchanged
    observability = ROOT / "deploy" / "observability"
    rule = one(objs, "PrometheusRule", "routeyard")
    assert rule["spec"] == _yaml.load(observability / "prometheusrule.yaml")["spec"]
    dashboard = one(objs, "ConfigMap", "routeyard-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["routeyard-dashboard.json"]) == json.loads(
        (observability / "routeyard-dashboard.json").read_text())
    tree = routes_tree(objs)
    assert tree["batch"]["database_url"].startswith("postgresql+asyncpg://")
    assert tree["batch"]["storage"]["url"].startswith("s3://")
    assert "auth" in tree


# --- routes.yaml -----------------------------------------------------------------------

def _stand_in(path: str) -> str:
    """Content for a key file production keeps in a Secret outside git."""
    if path.endswith((".yaml", ".yml")):
        key = "ry-" + secrets.token_urlsafe(32)
        return f"keys:\n  - id: stand-in\n    hash: {hash_key(key)}\n    models: ['*']\n"
    return "ry-" + secrets.token_urlsafe(32) + "\n"


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_routes_file_validates(rendered, name: str, tmp_path: Path) -> None:
    """Each ConfigMap's routes.yaml loads with routeyard's own loader, key files included."""
    objs = rendered[name]
    r = Router(objs)
    text = r.routes_text()
    tree = _yaml.load(text)
    keys_dir = r.mounts["keys"]["mountPath"] + "/"
    auth = tree.get("auth") or {}
    paths = [auth["keys_file"]] if auth.get("keys_file") else []
    paths += [k["key_file"] for k in auth.get("keys", []) + auth.get("admin_keys", [])
              if "key_file" in k]
    assert all(p.startswith(keys_dir) for p in paths), f"key files outside {keys_dir}: {paths}"
    secret_name = r.volumes["keys"]["secret"]["secretName"]
    secret = objects(objs, "Secret", secret_name)
    files = tmp_path / "keys"
    files.mkdir()
    for path in paths:
        relative = path.removeprefix(keys_dir)
        if secret:  # the Secret ships in this render (dev): the file must be in it
            assert relative in secret[0]["data"], f"{relative} not in Secret {secret_name}"
            (files / relative).write_bytes(base64.b64decode(secret[0]["data"][relative]))
        else:
            (files / relative).write_text(_stand_in(path))
    text = text.replace(keys_dir, f"{files}/")
    if "batch" in tree and "batch" not in RoutesFile.model_fields:
        # The batch: block is validated on its own until the routes loader knows it.
        BatchConfig.model_validate(tree["batch"])
        rt = YAML()
        doc = rt.load(text)
        del doc["batch"]
        buf = io.StringIO()
        rt.dump(doc, buf)
        text = buf.getvalue()
    config = parse(text.encode(), str(tmp_path / "routes.yaml"))
    assert len(config.models) == (0 if name == "base" else 5)
    assert (config.auth is not None) == bool(paths)


def test_production_serves_the_example_models(rendered) -> None:
    example = routes_tree(rendered["examples_vllm_routeyard"])
    production = routes_tree(rendered["overlays_production"])
    assert production["models"] == example["models"]
    assert production["defaults"] == example["defaults"]


def _served_names(args: list[str]) -> set[str]:
    names = [a.split("=", 1)[1] for a in args if a.startswith("--served-model-name=")]
    names += [args[i + 1] for i, a in enumerate(args[:-1])
              if a in ("--served-model-name", "--model")]
    return set(names) or {args[0]}  # vLLM: no flag means the model path itself


@pytest.mark.parametrize(("routes", "engines"), [
    ("examples_vllm_routeyard", "examples_vllm"),
    ("overlays_production", "examples_vllm"),
    ("overlays_dev", "overlays_dev"),
])
def test_routes_discover_the_engine_services(rendered, routes: str, engines: str) -> None:
    """Every backend is a headless Service of an AIBrix-labelled engine serving that model."""
    tree = routes_tree(rendered[routes])
    router_ns = Router(rendered[routes]).deployment["metadata"]["namespace"]
    found = set()
    for model, spec in tree["models"].items():
        for backend in spec["backends"]:
            assert backend["discovery"] == "dns", model
            url = urlsplit(backend["url"])
            host = url.hostname.split(".")
            name, ns = host[0], host[1] if len(host) > 1 else router_ns
            service = one([o for o in rendered[engines] if o["metadata"].get("namespace") == ns],
                          "Service", name)
            assert service["spec"]["clusterIP"] == "None", f"{name}: not headless"
            assert not service["spec"].get("publishNotReadyAddresses")
            (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
            pods = [d for d in objects(rendered[engines], "Deployment")
                    if d["metadata"].get("namespace") == ns
                    and selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]
                                ["labels"])]
            assert len(pods) == 1, f"{name}: {len(pods)} Deployments behind the Service"
            labels = pods[0]["spec"]["template"]["metadata"]["labels"]
            assert labels["model.aibrix.ai/name"] == name
            assert pods[0]["metadata"]["labels"]["model.aibrix.ai/name"] == name
            (engine,) = pods[0]["spec"]["template"]["spec"]["containers"]
            (container_port,) = [p for p in engine["ports"] if p["name"] == port["targetPort"]]
            assert labels["model.aibrix.ai/port"] == str(container_port["containerPort"])
            assert container_port["containerPort"] == url.port
            served = _served_names(engine["args"])
            assert spec.get("backend_model", model) in served, (model, served)
            assert engine["readinessProbe"]["httpGet"]["path"] == "/health"
            found.add(name)
    engines_here = {d["metadata"]["name"] for d in objects(rendered[engines], "Deployment")
                    if "model.aibrix.ai/name" in d["metadata"]["labels"]}
    assert found == engines_here, "an engine no route uses, or the reverse"


def test_vllm_examples(rendered) -> None:
    objs = rendered["examples_vllm"]
    deployments = objects(objs, "Deployment")
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"]
            for d in deployments} == MODEL_KINDS
    dns_refresh = seconds(routes_tree(rendered["examples_vllm_routeyard"])["defaults"]
                          ["dns_refresh"])
    for d in deployments:
        spec = d["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["image"].startswith("vllm/vllm-openai:v")
        for field in ("requests", "limits"):
            assert c["resources"][field]["nvidia.com/gpu"] == 1
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] == "/health"
        sleep = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
        assert sleep >= 2 * dns_refresh  # routeyard re-resolves before the engine stops
        assert spec["terminationGracePeriodSeconds"] > sleep
        assert d["metadata"]["labels"]["model.aibrix.ai/port"] == "8000"


# --- gateways --------------------------------------------------------------------------

def _matched(path: str, prefixes: list[str]) -> bool:
    """Gateway API PathPrefix: whole path elements."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


@pytest.mark.parametrize("name", ["examples_gateway_envoy-gateway", "examples_gateway_aibrix"])
def test_gateway_routes(rendered, name: str) -> None:
    objs = rendered[name]
    router = Router(rendered["examples_vllm_routeyard"])
    service = one(rendered["examples_vllm_routeyard"], "Service", "routeyard")
    route = one(objs, "HTTPRoute", "routeyard")
    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"] == service["spec"]["ports"][0]["port"]
    backend_ns = backend.get("namespace", route["metadata"]["namespace"])
    assert backend_ns == service["metadata"]["namespace"]
    if backend_ns != route["metadata"]["namespace"]:
        grant = one(objs, "ReferenceGrant")
        assert grant["metadata"]["namespace"] == backend_ns
        assert {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                "namespace": route["metadata"]["namespace"]} in grant["spec"]["from"]
    assert rule["timeouts"]["request"] == "0s"  # never cut a long stream

    prefixes = [m["path"]["value"] for m in rule["matches"]]
    assert all(m["path"]["type"] == "PathPrefix" for m in rule["matches"])
    api = {p for r in PROXIED for p in r.paths} | {"/v1/models", "/v1/files", "/v1/batches"}
    assert not [p for p in sorted(api) if not _matched(p, prefixes)], "API paths not routed"
    internal = ["/metrics", "/health", "/ready", "/admin/config", "/admin/backends",
                "/admin/status"]
    assert not [p for p in internal if _matched(p, prefixes)], "internal paths exposed"

    policy = one(objs, "BackendTrafficPolicy", "routeyard")
    assert policy["spec"]["targetRefs"][0]["name"] == "routeyard"
    idle = seconds(policy["spec"]["timeout"]["http"]["connectionIdleTimeout"])
    assert idle < float(router.env["ROUTEYARD_KEEP_ALIVE_TIMEOUT"])
    triggers = set(policy["spec"]["retry"]["retryOn"]["triggers"])
    assert triggers <= {"connect-failure", "refused-stream"}  # never replay a started stream


# --- image -----------------------------------------------------------------------------

def test_dockerfile() -> None:
    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?", text, re.MULTILINE)
    assert len(stages) == 2 and stages[0][1] == "build"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.MULTILINE)
    runtime = text.split("\nFROM ")[2]
    assert re.search(r'^ENTRYPOINT \["routeyard", "serve"\]$', runtime, re.MULTILINE)
    user = re.search(r"^USER (\d+):(\d+)$", runtime, re.MULTILINE)
    assert user and int(user[1]) != 0
    assert re.search(r"^HEALTHCHECK .*\n?.*urllib\.request\.urlopen\(.*/health", runtime,
                     re.MULTILINE)
    assert "COPY --from=build /opt/routeyard /opt/routeyard" in runtime
    # The image's defaults agree with the Deployment's mount and port.
    env = dict(re.findall(r"(ROUTEYARD_\w+)=(\S+)", runtime))
    assert env["ROUTEYARD_CONFIG"] == "/etc/routeyard/routes/routes.yaml"
    assert env["ROUTEYARD_PORT"] == "8080" and env["ROUTEYARD_HOST"] == "0.0.0.0"


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$",
                        (ROOT / "deploy" / "docker" / "Dockerfile").read_text(), re.MULTILINE)
    for source in " ".join(copied).split():
        assert source in allowed or source + "/" in allowed, f"{source} is ignored"


# --- docs ------------------------------------------------------------------------------

def test_deployment_doc_refers_to_real_files() -> None:
    text = (ROOT / "docs" / "deployment.md").read_text()
    paths = set(re.findall(r"(?<![\w/])deploy/(?:docker|kubernetes)\b[\w./-]*\w", text))
    assert paths, "docs/deployment.md names no file under deploy/"
    missing = [p for p in sorted(paths) if not (ROOT / p).exists()]
    assert not missing, f"docs/deployment.md names missing files: {missing}"
    for target in re.findall(r"kubectl apply -k ([\w./-]+)", text):
        assert (ROOT / target / "kustomization.yaml").exists(), target
