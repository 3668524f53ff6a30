"""Kubernetes manifests: render every overlay offline, validate against current schemas, check policy.

No cluster runs here, so this is everything that can be checked without one: `kubectl kustomize` renders
each overlay, `kubernetes-validate` checks every core object strictly against the JSON schemas it ships
(unknown fields are errors), the Prometheus-operator PodMonitor (a CRD, no schema shipped) is checked
structurally, and policy checks tie the manifests to the code: ports and drain time equal the server's
Settings, selectors select the pods, probes, limits and the security context are present.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.client import AFFINITY_HEADER
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "prod", "prod-envoy")
# The schemas kubernetes-validate ships for the newest release it knows (strict: unknown fields fail).
K8S_VERSION = kubernetes_validate.latest_version()
# The oldest release the manifests support: the preStop `sleep` action is on by default from 1.30
# (native gRPC probes are GA since 1.27).
K8S_OLDEST = "1.30.0"
CRD_GROUPS = ("monitoring.coreos.com",)


@dataclass(frozen=True)
class Rendered:
    """One rendered overlay: its objects, indexed by (kind, name)."""

    overlay: str
    objects: list[dict[str, Any]]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.overlay}: expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def settings_env(self) -> dict[str, str]:
        """The RNNSERVE_* variables the server container gets from its ConfigMap."""
        deployment = self.one("Deployment", "rnnserve")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        (ref,) = [e["configMapRef"]["name"] for e in container["envFrom"]]
        return dict(self.one("ConfigMap", ref)["data"])


def kubectl() -> str:
    """Path of kubectl; fails (never skips) when it is missing, since then nothing here is checked."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is not installed: the manifests cannot be rendered. Install it (the machine "
            "image's `kubectl` package; `.ci/run` checks for it) and re-run.",
            pytrace=False,
        )
    return path


def render(overlay: str) -> Rendered:
    out = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize deploy/overlays/{overlay} failed:\n{out.stderr}"
    objects = [o for o in yaml.safe_load_all(out.stdout) if o]
    assert objects, f"{overlay} rendered nothing"
    return Rendered(overlay, objects)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> Rendered:
    return render(request.param)


@pytest.fixture(scope="module")
def dev() -> Rendered:
    return render("dev")


@pytest.fixture(scope="module")
def prod() -> Rendered:
    return render("prod")


@pytest.fixture(scope="module")
def prod_envoy() -> Rendered:
    """prod with the Envoy component instead of the default HAProxy one."""
    return render("prod-envoy")


def workloads(r: Rendered) -> list[dict[str, Any]]:
    """Every Deployment and StatefulSet."""
    return [o for o in r.objects if o["kind"] in ("Deployment", "StatefulSet")]


def pod_labels(r: Rendered) -> dict[str, dict[str, str]]:
    """Workload name -> its pods' labels."""
    return {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"] for o in workloads(r)}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- schema validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [K8S_VERSION, K8S_OLDEST])
def test_every_core_object_validates_against_kubernetes_schemas(rendered: Rendered, version: str):
    checked = 0
    for obj in rendered.objects:
        if obj["apiVersion"].split("/")[0] in CRD_GROUPS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{rendered.overlay}: {obj['kind']}/{obj['metadata']['name']} "
                f"invalid for Kubernetes {version}: {exc}"
            )
        checked += 1
    assert checked == sum(1 for o in rendered.objects if o["apiVersion"].split("/")[0] not in CRD_GROUPS) >= 6


def test_schema_validation_catches_a_typo(prod: Rendered):
    """The validator is strict: a misspelt field in a Deployment is an error, so the check above can fail."""
    broken = copy.deepcopy(prod.one("Deployment", "rnnserve"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 8001}}  # sic
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_podmonitor_is_structurally_valid_and_scrapes_the_metrics_port(rendered: Rendered):
    (monitor,) = rendered.of_kind("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    deployment = rendered.one("Deployment", "rnnserve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(spec["selector"]["matchLabels"], labels), "PodMonitor selects no server pod"
    port_names = {
        p["name"]: p["containerPort"]
        for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
        assert port_names[endpoint["port"]] == Settings.model_fields["metrics_port"].default
        assert endpoint["path"] == "/metrics"


# --- policy --------------------------------------------------------------------------------


def test_settings_configmap_names_real_settings_and_parses(rendered: Rendered, monkeypatch):
    env = rendered.settings_env()
    fields = set(Settings.model_fields)
    for key in env:
        assert key.startswith("RNNSERVE_") and key[len("RNNSERVE_") :].lower() in fields, (
            f"unknown setting {key}"
        )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RNNSERVE_REPLICA_ID", "pod-0")
    settings = Settings()
    assert settings.grpc_port == Settings.model_fields["grpc_port"].default == 8001
    assert settings.metrics_port == Settings.model_fields["metrics_port"].default == 8002
    assert str(settings.model_repository) == "/app/models/repository"


def test_ports_equal_the_settings_defaults(rendered: Rendered):
    grpc_port = Settings.model_fields["grpc_port"].default
    metrics_port = Settings.model_fields["metrics_port"].default
    deployment = rendered.one("Deployment", "rnnserve")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    tls = "RNNSERVE_TLS_CERT_FILE" in rendered.settings_env()
    health_port = int(rendered.settings_env().get("RNNSERVE_HEALTH_PORT", -1))
    want = {"grpc": grpc_port, "metrics": metrics_port} | ({"health": health_port} if tls else {})
    assert ports == want
    # The kubelet's gRPC probes cannot speak TLS: with TLS on they ask the plaintext health-only port.
    probe_port = health_port if tls else grpc_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == probe_port, (
            f"{probe} is not a native gRPC probe on {probe_port}"
        )
    for name in ("rnnserve", "rnnserve-headless"):
        svc = rendered.one("Service", name)
        grpc = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc and grpc[0]["port"] == grpc_port and grpc[0]["targetPort"] == "grpc"
        assert grpc[0].get("appProtocol") == (None if tls else "kubernetes.io/h2c")
    metrics = [p for p in rendered.one("Service", "rnnserve")["spec"]["ports"] if p["name"] == "metrics"]
    assert metrics and metrics[0]["port"] == metrics_port
    assert rendered.one("Service", "rnnserve-headless")["spec"]["clusterIP"] == "None"


def test_termination_grace_covers_prestop_and_drain(rendered: Rendered):
    deployment = rendered.one("Deployment", "rnnserve")
    pod = deployment["spec"]["template"]["spec"]
    drain = float(
        rendered.settings_env().get("RNNSERVE_DRAIN_GRACE_S", Settings.model_fields["drain_grace_s"].default)
    )
    pre_stop = pod["containers"][0].get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain, (
        f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} must exceed "
        f"preStop {pre_stop} s "
        f"+ drain_grace_s {drain} s, or SIGKILL cuts the drain short"
    )


def test_workloads_have_probes_limits_and_a_locked_down_security_context(rendered: Rendered):
    for workload in workloads(rendered):
        name, pod = workload["metadata"]["name"], workload["spec"]["template"]["spec"]
        pod_sc = pod["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        claims = workload["spec"].get("volumeClaimTemplates", [])
        volume_names = {v["name"] for v in pod.get("volumes", [])} | {t["metadata"]["name"] for t in claims}
        for c in pod["containers"]:
            where = f"{rendered.overlay}: {name}/{c['name']}"
            assert "readinessProbe" in c and "livenessProbe" in c, f"{where}: probes missing"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}: resources.{kind} incomplete"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc.get("runAsUser", pod_sc.get("runAsUser", 0)) > 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert "@sha256:" in image or (tag and tag != "latest"), f"{where}: image {image} is not pinned"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volume_names, f"{where}: mount {m['name']} has no volume"


def test_server_has_a_writable_tmp_on_its_read_only_root(rendered: Rendered):
    pod = rendered.one("Deployment", "rnnserve")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_selectors_select_the_pods(rendered: Rendered):
    pods = pod_labels(rendered)
    server = pods["rnnserve"]
    for svc in rendered.of_kind("Service"):
        assert any(selects(svc["spec"]["selector"], labels) for labels in pods.values()), svc["metadata"][
            "name"
        ]
    # Every PDB guards the pods of exactly one workload, the server's PDB the server's pods.
    for pdb in rendered.of_kind("PodDisruptionBudget"):
        guarded = [n for n, labels in pods.items() if selects(pdb["spec"]["selector"]["matchLabels"], labels)]
        assert len(guarded) == 1, f"PDB {pdb['metadata']['name']} guards {guarded}"
    if rendered.of_kind("PodDisruptionBudget"):
        assert selects(
            rendered.one("PodDisruptionBudget", "rnnserve")["spec"]["selector"]["matchLabels"], server
        )
    # A workload's selector selects its own pods only (the proxies are never taken for servers, or back).
    for workload in workloads(rendered):
        name = workload["metadata"]["name"]
        selected = [
            n for n, labels in pods.items() if selects(workload["spec"]["selector"]["matchLabels"], labels)
        ]
        assert selected == [name], f"{name} selects the pods of {selected}"
    for policy in rendered.of_kind("NetworkPolicy"):
        assert any(selects(policy["spec"]["podSelector"]["matchLabels"], labels) for labels in pods.values())
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        rendered.one(ref["kind"], ref["name"])
    deployment = rendered.one("Deployment", "rnnserve")
    assert selects(deployment["spec"]["selector"]["matchLabels"], server)


def test_server_network_policy_admits_grpc_and_metrics(rendered: Rendered):
    policy = rendered.one("NetworkPolicy", "rnnserve")
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {
        Settings.model_fields["grpc_port"].default,
        Settings.model_fields["metrics_port"].default,
    }


# --- overlays --------------------------------------------------------------------------------


def test_dev_is_one_replica_in_memory_without_autoscaling(dev: Rendered):
    assert dev.one("Deployment", "rnnserve")["spec"]["replicas"] == 1
    assert dev.settings_env()["RNNSERVE_STORE"] == "memory"
    assert not dev.of_kind("HorizontalPodAutoscaler") and not dev.of_kind("PodDisruptionBudget")
    assert not dev.of_kind("StatefulSet")


def test_prod_runs_several_replicas_on_the_shared_redis_store(prod: Rendered):
    env = prod.settings_env()
    assert env["RNNSERVE_STORE"] == "redis"
    assert int(env["RNNSERVE_STORE_FLUSH_EVERY"]) == 1, (
        "prod must persist every step (no acknowledged step lost)"
    )
    assert prod.one("Deployment", "rnnserve")["spec"]["replicas"] >= 2
    hpa = prod.one("HorizontalPodAutoscaler", "rnnserve")["spec"]
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert prod.one("PodDisruptionBudget", "rnnserve")["spec"]["maxUnavailable"] == 1
    # The Redis URL names a Service of this render on the port that Service exposes.
    host_port = env["RNNSERVE_REDIS_URL"].removeprefix("redis://").split("/")[0]
    host, port = host_port.split(":")
    redis_svc = prod.one("Service", host)
    assert int(port) in {p["port"] for p in redis_svc["spec"]["ports"]}
    redis = prod.one("StatefulSet", "rnnserve-redis")
    assert selects(redis_svc["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction", (
        "sessions must never be evicted silently"
    )
    # The server may reach Redis, and only the server may.
    egress = prod.one("NetworkPolicy", "rnnserve-to-redis")["spec"]["egress"]
    assert any(p["port"] == int(port) for rule in egress for p in rule["ports"])
    ingress = prod.one("NetworkPolicy", "rnnserve-redis")["spec"]["ingress"]
    server_labels = prod.one("Deployment", "rnnserve")["spec"]["template"]["metadata"]["labels"]
    assert all(
        selects(src["podSelector"]["matchLabels"], server_labels) for rule in ingress for src in rule["from"]
    )


def test_replica_id_comes_from_the_pod_name(rendered: Rendered):
    container = rendered.one("Deployment", "rnnserve")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["RNNSERVE_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_every_container_env_var_is_a_real_setting(rendered: Rendered):
    container = rendered.one("Deployment", "rnnserve")["spec"]["template"]["spec"]["containers"][0]
    fields = set(Settings.model_fields)
    for var in container.get("env", []):
        assert var["name"].removeprefix("RNNSERVE_").lower() in fields, f"{var['name']} is not a setting"
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert ref.get("optional") is True, "a missing Secret must not keep the pods from starting"


def test_prod_state_key_comes_from_a_secret(prod: Rendered):
    container = prod.one("Deployment", "rnnserve")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["RNNSERVE_STATE_HMAC_KEY"]["valueFrom"]
    assert "RNNSERVE_STATE_HMAC_KEY" not in prod.settings_env(), "secrets never go into the ConfigMap"


# --- Envoy front proxy (prod-envoy): consistent hashing on the affinity header ----------------------------


def envoy_config(r: Rendered) -> dict[str, Any]:
    """The envoy.yaml that the rendered Envoy Deployment mounts (read from the ConfigMap of the render)."""
    pod = r.one("Deployment", "rnnserve-envoy")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    path = Path(args[args.index("--config-path") + 1])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    data = r.one("ConfigMap", volume["configMap"]["name"])["data"]
    assert path.name in data, f"{volume['configMap']['name']} has no key {path.name}"
    return yaml.safe_load(data[path.name])


def envoy_type_urls(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "@type":
                yield value
            else:
                yield from envoy_type_urls(value)
    elif isinstance(node, list):
        for value in node:
            yield from envoy_type_urls(value)


# envoy-data-plane warns "<Message>.<field> is deprecated" for fields Envoy deprecated (and will remove).
_DEPRECATED_FIELD = re.compile(r"\w+\.\w+ is deprecated")


def parse_envoy_bootstrap(config: dict[str, Any]) -> tuple[Any, list[str]]:
    """Parse a bootstrap config strictly against Envoy's v3 API; return it and the deprecated fields it uses.

    Unknown fields, bad enum values, bad durations and unregistered `@type`s raise. Each typed_config's
    package is imported first, which registers its message type for the `Any` field.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

        for url in set(envoy_type_urls(config)):
            package, _, name = url.removeprefix("type.googleapis.com/").rpartition(".")
            module = importlib.import_module(f"envoy_data_plane.{package}")
            assert hasattr(module, name), f"unknown Envoy type {url}"
        bootstrap = Bootstrap.from_dict(config)
    deprecated = sorted({str(w.message) for w in caught if _DEPRECATED_FIELD.fullmatch(str(w.message))})
    return bootstrap, deprecated


def seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def listener(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [x for x in config["static_resources"]["listeners"] if x["name"] == name]
    return found


def http_connection_manager(lst: dict[str, Any]) -> dict[str, Any]:
    (chain,) = lst["filter_chains"]
    (hcm,) = [f for f in chain["filters"] if f["name"] == "envoy.filters.network.http_connection_manager"]
    return hcm["typed_config"]


@pytest.fixture(scope="module")
def envoy(prod_envoy: Rendered) -> dict[str, Any]:
    return envoy_config(prod_envoy)


def test_dev_has_no_proxy(dev: Rendered):
    assert not [
        o for o in dev.objects if "envoy" in o["metadata"]["name"] or "haproxy" in o["metadata"]["name"]
    ]


def test_prod_has_one_proxy_each(prod: Rendered, prod_envoy: Rendered):
    """prod runs HAProxy (the default) and no Envoy; prod-envoy the reverse; otherwise the same objects."""

    def names(r: Rendered) -> set[tuple[str, str]]:
        return {
            (
                o["kind"],
                o["metadata"]["name"].rsplit("-", 1)[0]
                if o["kind"] == "ConfigMap"
                else o["metadata"]["name"],
            )
            for o in r.objects
        }

    assert not [n for n in names(prod) if "envoy" in n[1]]
    assert not [n for n in names(prod_envoy) if "haproxy" in n[1]]
    swap = {(kind, name.replace("haproxy", "envoy")) for kind, name in names(prod)}
    assert swap == names(prod_envoy)
    assert {o["metadata"].get("namespace") for o in prod_envoy.objects} == {"rnnserve"}


def test_envoy_config_is_valid_against_the_envoy_v3_api(envoy: dict[str, Any]):
    bootstrap, deprecated = parse_envoy_bootstrap(envoy)
    assert not deprecated, f"envoy.yaml uses fields Envoy deprecated: {deprecated}"
    (cluster,) = bootstrap.static_resources.clusters
    assert cluster.lb_policy.name in ("RING_HASH", "MAGLEV")


def test_envoy_api_check_catches_a_typo(envoy: dict[str, Any]):
    """The parse above can fail: a misspelt field inside a typed_config, a bad enum, a bad duration."""
    hcm = http_connection_manager(listener(envoy, "grpc"))
    mutations = [
        lambda c: http_connection_manager(listener(c, "grpc"))["route_config"]["virtual_hosts"][0]["routes"][
            0
        ]["route"]["hash_policy"][0]["header"].update(name=AFFINITY_HEADER),
        lambda c: c["static_resources"]["clusters"][0].update(lb_policy="RINGHASH"),
        lambda c: c["static_resources"]["clusters"][0].update(connect_timeout="2 seconds"),
        lambda c: http_connection_manager(listener(c, "grpc")).update({"@type": hcm["@type"] + "X"}),
    ]
    for mutate in mutations:
        broken = copy.deepcopy(envoy)
        mutate(broken)
        with pytest.raises((KeyError, ValueError, TypeError, AssertionError, ModuleNotFoundError)):
            parse_envoy_bootstrap(broken)


def test_envoy_hashes_sessions_by_the_client_affinity_header(prod_envoy: Rendered, envoy: dict[str, Any]):
    hcm = http_connection_manager(listener(envoy, "grpc"))
    assert hcm["codec_type"] == "HTTP2", "gRPC clients speak HTTP/2"
    assert [f["name"] for f in hcm["http_filters"]][-1] == "envoy.filters.http.router"
    (cluster,) = envoy["static_resources"]["clusters"]
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    (route,) = vhost["routes"]
    assert route["match"] == {"prefix": "/"}, "every gRPC method goes through the hashed route"
    action = route["route"]
    assert action["cluster"] == cluster["name"]
    headers = [p["header"]["header_name"] for p in action["hash_policy"] if "header" in p]
    assert headers == [AFFINITY_HEADER], "the route must hash on the header the client library sends"
    assert cluster["lb_policy"] in ("RING_HASH", "MAGLEV"), "a header hash needs a consistent-hash balancer"
    # Long-lived bidi streams: no route timeout, the client's deadline honoured, idle streams kept for at
    # least as long as a session may idle.
    assert seconds(action["timeout"]) == 0
    assert seconds(action["max_stream_duration"]["grpc_timeout_header_max"]) == 0
    assert seconds(hcm["stream_idle_timeout"]) >= Settings.model_fields["idle_ttl_s"].default
    assert seconds(hcm["common_http_protocol_options"]["idle_timeout"]) >= seconds(hcm["stream_idle_timeout"])


def test_envoy_upstream_is_every_server_pod_on_the_grpc_port(prod_envoy: Rendered, envoy: dict[str, Any]):
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS", "one host per address the headless Service resolves to"
    ((endpoint,),) = [group["lb_endpoints"] for group in cluster["load_assignment"]["endpoints"]]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address["port_value"] == Settings().grpc_port
    headless = prod_envoy.one("Service", "rnnserve-headless")
    assert address["address"] == f"rnnserve-headless.{headless['metadata']['namespace']}.svc.cluster.local"
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is False
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"], "gRPC upstreams need HTTP/2"
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"].get("service_name", "") == "", "the overall status, as the probes ask"
    assert cluster["common_lb_config"]["healthy_panic_threshold"]["value"] == 0, (
        "never route to a draining pod"
    )
    assert cluster["ignore_health_on_host_removal"] is True


def test_envoy_ports_probes_and_admin_agree_with_the_manifests(prod_envoy: Rendered, envoy: dict[str, Any]):
    container = prod_envoy.one("Deployment", "rnnserve-envoy")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc": listener(envoy, "grpc")["address"]["socket_address"]["port_value"],
        "probes": listener(envoy, "probes")["address"]["socket_address"]["port_value"],
    }
    svc = prod_envoy.one("Service", "rnnserve-envoy")
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "grpc" and "appProtocol" not in port  # TLS, not cleartext h2c
    envoy_pods = prod_envoy.one("Deployment", "rnnserve-envoy")["spec"]["template"]["metadata"]["labels"]
    assert selects(svc["spec"]["selector"], envoy_pods)
    # The readiness probe asks the health-check filter of the probe listener.
    probe = container["readinessProbe"]["httpGet"]
    assert ports[probe["port"]] == ports["probes"]
    (health,) = [
        f["typed_config"]
        for f in http_connection_manager(listener(envoy, "probes"))["http_filters"]
        if f["name"] == "envoy.filters.http.health_check"
    ]
    assert health["pass_through_mode"] is False
    assert {"name": ":path", "string_match": {"exact": probe["path"]}} in health["headers"]
    # The admin API can stop Envoy: loopback only. No shared memory on a read-only root: hot restart is off.
    assert envoy["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert "--disable-hot-restart" in container["args"]
    assert re.fullmatch(r"envoyproxy/envoy:v1\.\d+\.\d+", container["image"]), container["image"]


def test_envoy_may_reach_the_servers_and_nothing_else(prod_envoy: Rendered):
    policy = prod_envoy.one("NetworkPolicy", "rnnserve-envoy")["spec"]
    envoy_pods = prod_envoy.one("Deployment", "rnnserve-envoy")["spec"]["template"]["metadata"]["labels"]
    server_pods = prod_envoy.one("Deployment", "rnnserve")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["podSelector"]["matchLabels"], envoy_pods)
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    to_servers = [
        rule
        for rule in policy["egress"]
        if any(
            selects(peer.get("podSelector", {}).get("matchLabels", {}), server_pods) for peer in rule["to"]
        )
    ]
    assert {p["port"] for rule in to_servers for p in rule["ports"]} == {Settings().grpc_port}
    for rule in policy["egress"]:
        if rule not in to_servers:
            assert {p["port"] for p in rule["ports"]} == {53}, "only DNS besides the servers"
    # The servers' own policy admits the gRPC port from in-cluster peers (the proxies among them).
    server_ingress = prod_envoy.one("NetworkPolicy", "rnnserve")["spec"]["ingress"]
    assert any(
        "from" not in rule and Settings().grpc_port in {p["port"] for p in rule["ports"]}
        for rule in server_ingress
    )


# --- security (README "Security"): TLS, API keys, probes, cert-manager ------------------------------------

TLS_SECRET = "rnnserve-tls"
KEYS_SECRET = "rnnserve-api-keys"


def secret_mounts(r: Rendered, deployment: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Secret name -> (mount path, mount) of a Deployment's first container."""
    pod = r.one("Deployment", deployment)["spec"]["template"]["spec"]
    volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    mounts = pod["containers"][0]["volumeMounts"]
    return {volumes[m["name"]]: (m["mountPath"], m) for m in mounts if m["name"] in volumes}


def _secret_volumes_fail_closed(r: Rendered) -> None:
    pod = r.one("Deployment", "rnnserve")["spec"]["template"]["spec"]
    for v in pod["volumes"]:
        if "secret" in v:
            assert not v["secret"].get("optional"), f"{r.overlay} must not start without its Secrets"
            assert v["secret"]["defaultMode"] & 0o007 == 0, "secret files are not world-readable"
    for secret in (TLS_SECRET, KEYS_SECRET):
        assert not [o for o in r.of_kind("Secret") if o["metadata"]["name"] == secret], "no secrets in git"


def _settings_of(r: Rendered, monkeypatch) -> Settings:
    """The settings the pod gets, built as the server builds them (a mismatch would stop it at start)."""
    for key, value in r.settings_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RNNSERVE_REPLICA_ID", "pod-0")
    return Settings()


@pytest.mark.parametrize("overlay", ["prod", "prod-envoy"])
def test_prod_requires_api_keys_from_a_secret(
    overlay: str, prod: Rendered, prod_envoy: Rendered, monkeypatch
):
    r = prod if overlay == "prod" else prod_envoy
    env = r.settings_env()
    keys_dir, keys_mount = secret_mounts(r, "rnnserve")[KEYS_SECRET]
    assert keys_mount.get("readOnly") is True
    assert env["RNNSERVE_AUTH"] == "api_keys"
    assert Path(env["RNNSERVE_API_KEYS_FILE"]).parent == Path(keys_dir)
    _secret_volumes_fail_closed(r)
    assert _settings_of(r, monkeypatch).grpc_host == "0.0.0.0"


@pytest.mark.parametrize("overlay", ["prod", "prod-envoy"])
def test_prod_serves_mutual_tls_from_a_secret(
    overlay: str, prod: Rendered, prod_envoy: Rendered, monkeypatch
):
    r = prod if overlay == "prod" else prod_envoy
    env = r.settings_env()
    tls_dir, tls_mount = secret_mounts(r, "rnnserve")[TLS_SECRET]
    assert tls_mount.get("readOnly") is True
    for key, name in [
        ("RNNSERVE_TLS_CERT_FILE", "tls.crt"),
        ("RNNSERVE_TLS_KEY_FILE", "tls.key"),
        ("RNNSERVE_TLS_CLIENT_CA_FILE", "ca.crt"),
    ]:
        assert Path(env[key]) == Path(tls_dir) / name, key
    _secret_volumes_fail_closed(r)
    settings = _settings_of(r, monkeypatch)
    assert settings.tls_client_ca_file is not None and settings.health_port > 0


def test_an_open_server_is_development_only_and_binds_explicitly(rendered: Rendered, monkeypatch):
    env = rendered.settings_env()
    if env.get("RNNSERVE_AUTH", "none") == "none":
        assert rendered.overlay == "dev", f"{rendered.overlay} serves without authentication"
        # With auth none the server binds loopback unless told otherwise: in a pod it must be told.
        assert env["RNNSERVE_GRPC_HOST"] == "0.0.0.0"


def test_envoy_speaks_tls_both_ways_with_the_mounted_certificate(prod_envoy: Rendered, envoy: dict[str, Any]):
    tls_dir = Path(secret_mounts(prod_envoy, "rnnserve-envoy")[TLS_SECRET][0])
    (chain,) = listener(envoy, "grpc")["filter_chains"]
    down = chain["transport_socket"]["typed_config"]
    assert down["@type"].endswith("DownstreamTlsContext")
    assert down["common_tls_context"]["alpn_protocols"] == ["h2"]
    (cert,) = down["common_tls_context"]["tls_certificates"]
    assert Path(cert["certificate_chain"]["filename"]) == tls_dir / "tls.crt"
    assert Path(cert["private_key"]["filename"]) == tls_dir / "tls.key"
    assert Path(cert["watched_directory"]["path"]) == tls_dir, "a rotated certificate must be picked up"
    (cluster,) = envoy["static_resources"]["clusters"]
    up = cluster["transport_socket"]["typed_config"]
    assert up["@type"].endswith("UpstreamTlsContext")
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    host = address["socket_address"]["address"]
    assert up["sni"] == host
    ctx = up["common_tls_context"]
    assert Path(ctx["validation_context"]["trusted_ca"]["filename"]) == tls_dir / "ca.crt"
    sans = ctx["validation_context"]["match_typed_subject_alt_names"]
    assert {"san_type": "DNS", "matcher": {"exact": host}} in sans
    # The servers require a client certificate (RNNSERVE_TLS_CLIENT_CA_FILE): Envoy presents one.
    assert "RNNSERVE_TLS_CLIENT_CA_FILE" in prod_envoy.settings_env() and ctx["tls_certificates"]


def test_cert_manager_component_issues_the_secret_everyone_mounts(tmp_path: Path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "rnnserve",
                "resources": [os.path.relpath(ROOT / "deploy" / "overlays" / "prod-envoy", overlay)],
                "components": [os.path.relpath(ROOT / "deploy" / "components" / "cert-manager", overlay)],
            }
        )
    )
    out = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    r = Rendered("prod-envoy+cert-manager", [o for o in yaml.safe_load_all(out.stdout) if o])
    cert = r.one("Certificate", TLS_SECRET)
    assert cert["apiVersion"] == "cert-manager.io/v1" and cert["metadata"]["namespace"] == "rnnserve"
    spec = cert["spec"]
    assert spec["secretName"] == TLS_SECRET
    assert {"server auth", "client auth"} <= set(spec["usages"]), "Envoy uses it as a client certificate too"
    assert spec["issuerRef"]["name"] and spec["issuerRef"]["kind"] in ("Issuer", "ClusterIssuer")
    envoy = envoy_config(r)
    (cluster,) = envoy["static_resources"]["clusters"]
    upstream_host = cluster["transport_socket"]["typed_config"]["sni"]
    svc_ns = r.one("Service", "rnnserve-envoy")["metadata"]["namespace"]
    assert upstream_host in spec["dnsNames"]
    assert f"rnnserve-envoy.{svc_ns}.svc" in spec["dnsNames"], "clients dial the Envoy Service by name"
    assert TLS_SECRET in secret_mounts(r, "rnnserve") and TLS_SECRET in secret_mounts(r, "rnnserve-envoy")
