"""The deployment files validate offline: KubeRay manifests against the CRD schemas (strictly), Serve configs
against Ray's own schema, entrypoints and import paths resolve, one Ray version everywhere, the kustomize
overlays build, the monitoring files name only metrics the app exports, the cluster-launcher YAMLs follow
Ray's launcher schema. Each check is also shown to fail on a broken copy."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
LAUNCHER = ROOT / "cluster" / "launcher"
CRDS = ROOT.parent / "shared" / "kuberay-crds"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
CLUSTER_SPEC = {
    "RayCluster": ("spec",),
    "RayJob": ("spec", "rayClusterSpec"),
    "RayService": ("spec", "rayClusterConfig"),
}
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))


def ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", d.replace(" ", "")))]
    assert len(pins) == 1, f"pyproject.toml should pin ray exactly once, found {pins}"
    return pins[0]


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and "components" not in p.parts)


def ray_docs(docs: list[dict]) -> list[dict]:
    return [d for d in docs if isinstance(d, dict) and d.get("apiVersion") == "ray.io/v1"]


# ------------------------------------------------------------------------------ CRD schemas, strict


def strict(schema: dict) -> dict:
    """The CRD's openAPIV3Schema as JSON Schema where an unknown field is an error: every object that lists
    ``properties`` gets ``additionalProperties: false`` unless the schema preserves unknown fields there;
    ``nullable`` becomes a null type."""
    out = copy.deepcopy(schema)

    def walk(node: dict) -> None:
        if node.get("nullable") and "type" in node:
            node["type"] = [node["type"], "null"]
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for key in ("properties", "patternProperties"):
            for child in node.get(key, {}).values():
                walk(child)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("anyOf", "allOf", "oneOf"):
            for child in node.get(key, []):
                walk(child)

    walk(out)
    return out


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    path = CRDS / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    crd = yaml.load(
        path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    )  # 3 MB: libyaml is 20x faster
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict) -> list[str]:
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_strict_schema_rejects_unknown_fields_only_where_not_preserved():
    schema = strict(
        {
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"b": {"type": "string"}}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}},
                "map": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        }
    )
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"a": {"b": "x"}, "free": {"anything": 1}, "map": {"k": "v"}})
    assert not v.is_valid({"a": {"bb": "x"}})
    assert not v.is_valid({"extra": 1})


def test_every_kuberay_manifest_validates_strictly():
    docs = [(p, d) for p in manifest_files() for d in ray_docs(load_docs(p))]
    assert {d["kind"] for _, d in docs} == {"RayCluster", "RayJob", "RayService"}
    for path, doc in docs:
        assert crd_errors(doc) == [], path


@pytest.mark.parametrize(
    "path, mutate",
    [
        (("spec",), lambda s: s.__setitem__("enableInTreeAutoscalling", s.pop("enableInTreeAutoscaling"))),
        (
            ("spec", "headGroupSpec", "template", "spec", "containers", 0),
            lambda c: c.__setitem__("imagePullPolice", "Always"),
        ),
        (("spec", "workerGroupSpecs", 0), lambda g: g.__setitem__("replicas", "two")),
        (("spec", "autoscalerOptions"), lambda a: a.__setitem__("upscalingMode", "Sometimes")),
    ],
    ids=["misspelled-spec-field", "misspelled-container-field", "wrong-type", "bad-enum"],
)
def test_a_broken_manifest_fails(path, mutate):
    (doc,) = load_docs(K8S / "base" / "raycluster.autoscaling.yaml")
    broken = copy.deepcopy(doc)
    node = broken
    for key in path:
        node = node[key]
    mutate(node)
    assert crd_errors(broken), f"a mutation at {path} went unnoticed"


# ------------------------------------------------------------------------------ Ray version everywhere


def ray_versions(text: str) -> list[str]:
    """Every Ray version a file names: rayVersion fields, image tags (rayproject/ray:X, ray-mtrec:rayX),
    pip pins (ray[...]==X) and the Dockerfile's RAY_VERSION."""
    patterns = [
        r"rayVersion:\s*\"?([\w.]+)\"?",
        r"rayproject/ray:([\d.]+)",
        r"ray-mtrec:ray([\d.]+)",
        r"newTag:\s*ray([\d.]+)",
        r"\bray(?:\[[^\]]*\])?==([\d.]+)",
        r"ARG RAY_VERSION=([\d.]+)",
    ]
    return [v for p in patterns for v in re.findall(p, text)]


def versioned_files() -> list[Path]:
    return [*K8S.rglob("*.yaml"), K8S / "Dockerfile", *LAUNCHER.glob("*.yaml")]


def version_problems(paths: list[Path], pin: str) -> list[str]:
    """Each file naming a Ray version other than ``pin`` (a rayVersion, an image tag, a pip pin), each
    Ray custom resource whose rayVersion is not ``pin``, and a Dockerfile not built on RAY_VERSION."""
    problems = []
    for path in paths:
        text = path.read_text()
        found = ray_versions(text)
        if any(v != pin for v in found):
            problems.append(f"{path}: Ray versions {found} differ from pyproject's {pin}")
        if path.suffix == ".yaml":
            for doc in ray_docs(load_docs(path)):
                spec = doc
                for key in CLUSTER_SPEC.get(doc["kind"], ()):
                    spec = spec[key]
                if spec.get("rayVersion") != pin:
                    problems.append(
                        f"{path}: {doc['kind']} {doc['metadata']['name']} rayVersion {spec.get('rayVersion')}"
                    )
        elif path.name == "Dockerfile" and not re.search(r"FROM rayproject/ray:\$\{RAY_VERSION\}", text):
            problems.append(f"{path}: the base image is not rayproject/ray:${{RAY_VERSION}}")
    return problems


def test_one_ray_version_everywhere():
    assert version_problems(versioned_files(), ray_pin()) == []


def test_a_wrong_ray_version_fails(tmp_path):
    """Each way a version can drift is caught, by the same check as above, and the message names the file."""
    pin = ray_pin()
    job = tmp_path / "rayjob.train.yaml"
    (doc,) = load_docs(K8S / "jobs" / "rayjob.train.yaml")
    doc["spec"]["rayClusterSpec"]["rayVersion"] = "2.59.0"
    job.write_text(yaml.safe_dump(doc))
    tag = tmp_path / "raycluster.autoscaling.yaml"  # rayVersion right, the image tag wrong
    tag.write_text((K8S / "base" / tag.name).read_text().replace(f"ray-mtrec:ray{pin}", "ray-mtrec:ray2.59.0"))
    docker = tmp_path / "Dockerfile"
    docker.write_text((K8S / "Dockerfile").read_text().replace(f"ARG RAY_VERSION={pin}", "ARG RAY_VERSION=2.59.0"))
    assert "2.59.0" not in "".join(p.read_text() for p in versioned_files())  # the originals agree with the pin
    for path in (job, tag, docker):
        problems = version_problems([path], pin)
        assert problems and all(str(path) in m for m in problems), (path, problems)
    assert any("RayJob mtrec-train rayVersion 2.59.0" in m for m in version_problems([job], pin))


def test_dockerfile_copies_what_exists_and_installs_the_package():
    text = (K8S / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (?:--\S+ )*(.+?) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"Dockerfile copies {part}, which does not exist"
    assert "pip install --no-cache-dir ." in text
    ignore = (K8S / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][0] == "*" and "!mtrec/" in ignore  # everything else stays out


# ------------------------------------------------------------------------------ entrypoints and Serve configs


def job_commands() -> list[tuple[Path, str]]:
    out = [(p, d["spec"]["entrypoint"]) for p in manifest_files() for d in load_docs(p) if d.get("kind") == "RayJob"]
    assert len(out) == 2
    return out


def check_entrypoint(command: str) -> None:
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], command
    module = argv[2]
    assert importlib.util.find_spec(module) is not None, f"entrypoint module {module} does not resolve"
    parse = getattr(importlib.import_module(module), "parse_args", None)
    if parse is not None:  # the arguments too: argparse exits on an unknown flag
        parse(argv[3:])


def test_every_entrypoint_resolves_with_its_arguments():
    for _, command in job_commands():
        check_entrypoint(command)


def test_a_wrong_entrypoint_fails():
    with pytest.raises(AssertionError):
        check_entrypoint("python -m train.runn --data x --out y")
    with pytest.raises(SystemExit):
        check_entrypoint("python -m mtrec_train.run --dataset x --out y")


def serve_configs() -> list[tuple[dict, dict]]:
    """(RayService document, its parsed serveConfigV2)."""
    out = []
    for p in manifest_files():
        for d in load_docs(p):
            if d.get("kind") == "RayService":
                out.append((d, yaml.safe_load(d["spec"]["serveConfigV2"])))
    assert out
    return out


def check_serve_config(config: dict) -> None:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    from mtrec_serve.app import AppArgs
    from mtrec_serve.config import DEPLOYMENTS

    assert set(config) == {"applications"}, "serveConfigV2 holds the applications block only"
    ServeDeploySchema(**config)
    for app in config["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr)), app["import_path"]
        AppArgs.model_validate(app["args"])
        for dep in app["deployments"]:
            assert dep["name"] in DEPLOYMENTS, dep["name"]
            unknown = set(dep) - set(DeploymentSchema.model_fields)
            assert not unknown, f"{dep['name']}: unknown keys {unknown}"
            if "autoscaling_config" in dep:
                block = dep["autoscaling_config"]
                assert set(block) <= set(AutoscalingConfig.model_fields), f"{dep['name']}: {set(block)}"
                AutoscalingConfig(**block)
                assert block["min_replicas"] <= block["max_replicas"]


def test_serve_config_parses_with_rays_schema():
    for _, config in serve_configs():
        check_serve_config(config)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda a: a["deployments"][1]["autoscaling_config"].__setitem__("max_replica", 3),
        lambda a: a["deployments"][1]["autoscaling_config"].__setitem__("min_replicas", 99),
        lambda a: a["deployments"][1].__setitem__("num_replica", 2),
        lambda a: a["args"].__setitem__("polcy", "bandit"),
        lambda a: a.__setitem__("import_path", "mtrec_serve.app:build_ap"),
    ],
    ids=["autoscaling-key", "min-above-max", "deployment-key", "app-arg", "import-path"],
)
def test_a_broken_serve_config_fails(mutate):
    (_, config), *_ = serve_configs()
    broken = copy.deepcopy(config)
    mutate(broken["applications"][0])
    with pytest.raises((AssertionError, ValueError, AttributeError)):
        check_serve_config(broken)


def generated_by(doc: dict) -> list[str]:
    """The `mtrec serve config ...` command named in the RayService's comment."""
    text = (K8S / "base" / "rayservice.serve.yaml").read_text()
    m = re.search(r"^\s*#\s*(mtrec serve config .+)$", text, re.M)
    assert m, "rayservice.serve.yaml should name the command that generated its serveConfigV2"
    return shlex.split(m.group(1))


def test_serve_config_equals_a_fresh_generation(tmp_path):
    from mtrec_app.cli import main

    (doc, config), *_ = serve_configs()
    argv = generated_by(doc)
    out = tmp_path / "serve.yaml"
    assert main([*argv[1:], "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text()) == config


# ------------------------------------------------------------------------------ kustomize


def kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl:
        cmd = [kubectl, "kustomize", str(path)]
    elif shutil.which("kustomize"):
        cmd = [shutil.which("kustomize"), "build", str(path)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed (the reference checks still ran)")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def kustomization_refs(path: Path) -> tuple[list[dict], list[tuple[dict, list, bool]]]:
    """The documents a kustomization (recursively) includes, and its patches (target, operations, required).
    A component's patches apply to whatever of their kind is there (none is fine); an overlay's must hit."""
    k = yaml.safe_load((path / "kustomization.yaml").read_text())
    component = k.get("kind") == "Component"
    docs: list[dict] = []
    patches: list[tuple[dict, list, bool]] = []
    for ref in [*k.get("resources", []), *k.get("components", [])]:
        target = (path / ref).resolve()
        assert target.exists(), f"{path}/kustomization.yaml: {ref} does not exist"
        if target.is_dir():
            sub_docs, sub_patches = kustomization_refs(target)
            docs += sub_docs
            patches += sub_patches
        else:
            docs += load_docs(target)
    for g in k.get("configMapGenerator", []):
        for f in g.get("files", []):
            assert (path / f).exists(), f"{path}/kustomization.yaml: {f} does not exist"
        docs.append({"kind": "ConfigMap", "metadata": {"name": g["name"]}})
    for p in k.get("patches", []):
        ops = yaml.safe_load(p["patch"] if "patch" in p else (path / p["path"]).read_text())
        patches.append((p["target"], ops, not component))
    return docs, patches


def json_path_exists(doc: dict, pointer: str) -> bool:
    node = doc
    for raw in pointer.lstrip("/").split("/"):
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                return False
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return False
    return True


def check_patch_targets(docs: list[dict], patches: list[tuple[dict, list, bool]]) -> None:
    for target, ops, required in patches:
        hits = [
            d
            for d in docs
            if d.get("kind") == target["kind"] and target.get("name") in (None, d.get("metadata", {}).get("name"))
        ]
        assert hits or not required, f"patch target {target} matches no resource"
        for op in ops:
            parent = op["path"].rsplit("/", 1)[0]
            for d in hits:
                path = op["path"] if op["op"] in ("replace", "remove") else parent
                assert json_path_exists(d, path), f"patch {op['op']} {op['path']} misses {d['metadata']['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_references_and_patch_targets_exist(overlay):
    docs, patches = kustomization_refs(overlay)
    assert patches
    check_patch_targets(docs, patches)


def test_a_patch_on_a_missing_path_fails():
    docs, _ = kustomization_refs(K8S / "overlays" / "dev")
    bad = [
        (
            {"kind": "RayCluster", "name": "mtrec"},
            [{"op": "replace", "path": "/spec/workerGroupSpecs/3/replicas"}],
            True,
        )
    ]
    with pytest.raises(AssertionError):
        check_patch_targets(docs, bad)
    with pytest.raises(AssertionError):
        check_patch_targets(docs, [({"kind": "RayService", "name": "nope"}, [], True)])


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_builds_and_validates(overlay):
    docs = kustomize(overlay)
    pin = ray_pin()
    gpu = overlay.name.startswith("prod")
    namespaces = {d["metadata"].get("namespace") for d in docs}
    assert len(namespaces) == 1 and None not in namespaces
    for doc in ray_docs(docs):
        assert crd_errors(doc) == [], f"{overlay.name}: {doc['metadata']['name']}"
        spec = doc
        for key in CLUSTER_SPEC[doc["kind"]]:
            spec = spec[key]
        images = [
            c["image"]
            for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
            for c in g["template"]["spec"]["containers"]
        ]
        assert all(i == f"ray-mtrec:ray{pin}-{'gpu' if gpu else 'cpu'}" for i in images), images
        limits = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert ("nvidia.com/gpu" in limits) == gpu
        assert spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


# ------------------------------------------------------------------------------ monitoring


# Ray Serve's own gauges the dashboard plots (replicas per deployment), as Ray exports them
RAY_SERVE_GAUGES = ("serve_deployment_replica_healthy", "serve_autoscaling_target_replicas")


def exported_series() -> set[str]:
    """Every series the dashboard and rules may read: the app's, and the Ray Serve gauges Ray defines."""
    from mtrec_serve.metrics import METRICS, exported_name

    out = set()
    for name, spec in METRICS.items():
        series = ("bucket", "sum", "count") if spec.kind == "histogram" else ("",)
        out |= {exported_name(name, s) for s in series}
    return out | {f"ray_{g}" for g in RAY_SERVE_GAUGES if g in ray_serve_gauges()}


@cache
def ray_serve_gauges() -> set[str]:
    """Names of the gauges the installed Ray Serve's controller defines (read from its source)."""
    import ray.serve

    private = Path(ray.serve.__file__).parent / "_private"
    text = "".join(f.read_text() for f in private.glob("*.py"))
    return set(re.findall(r'Gauge\(\s*"([a-z_]+)"', text))


def dashboard() -> dict:
    return json.loads((K8S / "base" / "grafana" / "dashboard.serving.json").read_text())


def dashboard_exprs(board: dict) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


def rule_exprs() -> list[str]:
    (doc,) = load_docs(K8S / "base" / "prometheusrule.alerts.yaml")
    return [r["expr"] for g in doc["spec"]["groups"] for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    """The series a PromQL expression reads (label matchers and by/without lists removed first)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", expr)
    return set(re.findall(r"\b(ray_[a-z0-9_]+)", expr))


def test_monitoring_names_only_metrics_the_app_exports():
    known = exported_series()
    exprs = dashboard_exprs(dashboard()) + rule_exprs()
    used = set().union(*map(metric_names, exprs))
    assert used and used <= known, used - known
    titles = " ".join(p["title"] for p in dashboard()["panels"]).lower()
    for topic in ("impressions", "feedback", "ctr", "cvr", "latency", "weights", "staleness", "replicas"):
        assert topic in titles, topic
    assert metric_names("rate(ray_mtrec_impresions_total[5m])") - known  # a typo is caught


def test_dashboard_ships_as_a_configmap():
    k = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    (gen,) = k["configMapGenerator"]
    assert gen["options"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard()["uid"] and {v["name"] for v in dashboard()["templating"]["list"]} >= {"datasource", "cluster"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) not installed")
def test_alert_rules_pass_promtool(tmp_path):
    (doc,) = load_docs(K8S / "base" / "prometheusrule.alerts.yaml")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    done = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {r["alert"] for g in doc["spec"]["groups"] for r in g["rules"]} >= {
        "MtrecControllerStale",
        "MtrecControllerNonFiniteInput",
        "MtrecControllerRejectingReads",
        "MtrecHighErrorRate",
        "MtrecHighLatency",
    }


def test_monitoring_keeps_each_deployment_apart():
    """Deployments sharing a Prometheus (dev and prod) must not mix: every dashboard query filters on the
    deployment (Ray Serve's own gauges, which carry no deployment id, on the Ray cluster and the Serve
    application), and every alert but the absence check is per deployment."""
    ours = [e for e in dashboard_exprs(dashboard()) if "ray_serve_" not in e]
    assert all('deployment_id=~"$deployment"' in e for e in ours), ours
    rays = [e for e in dashboard_exprs(dashboard()) if "ray_serve_" in e]
    assert rays and all('ray_io_cluster=~"$cluster", application=~"$application"' in e for e in rays), rays
    assert all("deployment_id" in e for e in rule_exprs() if not e.startswith("absent(")), rule_exprs()


def test_podmonitors_select_ray_pods_by_node_type():
    for role, ports in (("head", {"metrics", "as-metrics", "dash-metrics"}), ("worker", {"metrics"})):
        (doc,) = load_docs(K8S / "base" / f"podmonitor.{role}.yaml")
        assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PodMonitor"
        assert doc["spec"]["selector"]["matchLabels"]["ray.io/node-type"] == role
        assert {e["port"] for e in doc["spec"]["podMetricsEndpoints"]} == ports
    named = {
        p["name"]
        for d in ray_docs(load_docs(K8S / "base" / "raycluster.autoscaling.yaml"))
        for c in d["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
        for p in c["ports"]
    }
    assert {"metrics", "as-metrics", "dash-metrics"} <= named  # the ports the monitors name exist


def test_network_policy_keeps_control_ports_inside():
    (doc,) = load_docs(K8S / "base" / "networkpolicy.ray.yaml")
    assert doc["spec"]["policyTypes"] == ["Ingress"]
    for rule in doc["spec"]["ingress"]:
        sources = rule["from"]
        ports = {p["port"] for p in rule.get("ports", [])}
        if any(s.get("namespaceSelector") == {} for s in sources):  # any namespace: only Serve's port
            assert ports == {8000}
        if not ports:  # every port: only from this namespace
            assert sources == [{"podSelector": {}}]
        assert not any("ipBlock" in s for s in sources)


# ------------------------------------------------------------------------------ cluster launcher


@cache
def launcher_validator() -> jsonschema.Draft7Validator:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("path", sorted(LAUNCHER.glob("*.yaml")), ids=lambda p: p.name)
def test_launcher_yaml_follows_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in launcher_validator().iter_errors(config)]
    assert errors == []
    assert config["provider"]["type"] in ("local", "aws")
    starts = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts and "RAY_AUTH_MODE=token" in starts
    if config["provider"]["type"] == "local":
        assert config["max_workers"] == len(config["provider"]["worker_ips"])
    else:
        assert config["head_node_type"] in config["available_node_types"]


def test_a_broken_launcher_yaml_fails():
    config = yaml.safe_load((LAUNCHER / "cluster.aws.yaml").read_text())
    broken = copy.deepcopy(config)
    broken["idle_timeout_minute"] = broken.pop("idle_timeout_minutes")
    assert not launcher_validator().is_valid(broken)


def test_python_of_the_image_matches_the_supported_range():
    tag = re.search(r"ARG PYTHON=py3(\d+)", (K8S / "Dockerfile").read_text())
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = int(re.search(r">=3\.(\d+)", requires).group(1))
    assert tag and int(tag.group(1)) >= minimum
    assert sys.version_info >= (3, minimum)
