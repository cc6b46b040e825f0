"""Checks of the KubeRay manifests and the container image recipe in cluster/.

No Ray and no Kubernetes: every RayCluster and RayJob is validated against the v1 OpenAPI
schema of its CRD (copied into tests/data/kuberay/) and walked for unknown fields the way the
API server's strict field validation rejects them; then the properties the deployment relies
on are checked one by one, and the versions pinned in four places must agree.

A manifest's variants are in its name: `-gpu` requests GPUs, `-s3` keeps runs and data in a
bucket (credentials from a Secret) instead of on the `raymb-runs` claim.
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pyproject.toml installs tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRD_DIR = Path(__file__).resolve().parents[1] / "data" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
RUNS_CLAIM = "raymb-runs"
RUNS_MOUNT = "/mnt/raymb-runs"
# Top-level metadata is `type: object` in the CRDs (the API server checks ObjectMeta itself).
OBJECT_META = {"name", "namespace", "labels", "annotations", "generateName", "finalizers"}

Doc = dict[str, Any]


def _load_manifests() -> dict[str, list[Doc]]:
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        for path in sorted(CLUSTER.glob("*.yaml"))
    }


MANIFESTS = _load_manifests()
RAY_DOCS = [
    pytest.param(name, doc, id=f"{name}:{doc['kind']}")
    for name, docs in MANIFESTS.items()
    for doc in docs
    if doc.get("kind") in CRD_FILES
]


def variants(name: str) -> set[str]:
    """The variant tags of a manifest's file name: rayjob-gpu.yaml -> {"gpu"}."""
    return set(Path(name).stem.split("-")[1:])


def is_gpu_manifest(name: str) -> bool:
    return "gpu" in variants(name)


def is_bucket_manifest(name: str) -> bool:
    """Runs and data in an object store, reached with credentials from a Secret."""
    return "s3" in variants(name)


def cluster_spec(doc: Doc) -> Doc:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def ray_pod_templates(doc: Doc) -> Iterator[tuple[str, Doc]]:
    """(group name, pod template) of the head and every worker group."""
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def all_containers(doc: Doc) -> Iterator[tuple[str, Doc]]:
    """(where, container) of every container the manifest starts, the submitter included."""
    templates = list(ray_pod_templates(doc))
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        templates.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    for group, template in templates:
        for kind in ("initContainers", "containers"):
            for container in template["spec"].get(kind, []):
                yield f"{group}/{container['name']}", container


# ---------------------------------------------------------------- schema validation


def to_json_schema(node: Doc) -> Doc:
    """A CRD structural schema as plain JSON Schema: x-kubernetes-* keys dropped,
    int-or-string and nullable spelled out."""
    out = {key: value for key, value in node.items() if not key.startswith("x-kubernetes-")}
    if "properties" in out:
        out["properties"] = {key: to_json_schema(sub) for key, sub in out["properties"].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = to_json_schema(out["items"])
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    elif "anyOf" in out:
        out["anyOf"] = [to_json_schema(sub) for sub in out["anyOf"]]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def unknown_fields(value: Any, schema: Doc, path: str = "") -> Iterator[str]:
    """Paths of keys that strict field validation would reject: keys a node's `properties`
    do not name, where the node has no additionalProperties and keeps no unknown fields."""
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if properties is not None and key in properties:
                yield from unknown_fields(item, properties[key], where)
            elif isinstance(extra, dict):
                yield from unknown_fields(item, extra, where)
            elif properties is not None and extra is None:
                if not schema.get("x-kubernetes-preserve-unknown-fields"):
                    yield where
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from unknown_fields(item, schema["items"], f"{path}[{index}]")


def _json_path(parts: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


@dataclass(frozen=True)
class CrdSchema:
    schema: Doc  # the CRD's openAPIV3Schema as written, for the strict walk
    validator: jsonschema.protocols.Validator

    def problems(self, doc: Doc) -> list[str]:
        found = [
            f"{_json_path(error.absolute_path) or '<root>'}: {error.message}"
            for error in self.validator.iter_errors(doc)
        ]
        found += [f"{path}: unknown field" for path in unknown_fields(doc, self.schema)]
        found += [
            f"metadata.{key}: unknown field"
            for key in doc.get("metadata", {})
            if key not in OBJECT_META
        ]
        return found


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, CrdSchema]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML
    schemas = {}
    for kind, filename in CRD_FILES.items():
        crd = yaml.load((CRD_DIR / filename).read_text(), Loader=loader)
        assert crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = v1["schema"]["openAPIV3Schema"]
        schemas[kind] = CrdSchema(schema, jsonschema.Draft7Validator(to_json_schema(schema)))
    return schemas


def test_every_manifest_parses_to_known_kinds() -> None:
    assert MANIFESTS, "no cluster/*.yaml"
    known = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("v1", "PersistentVolumeClaim")}
    for name, docs in MANIFESTS.items():
        assert docs, f"{name} is empty"
        for doc in docs:
            assert (doc.get("apiVersion"), doc.get("kind")) in known, name
            assert doc["metadata"]["name"], name


@pytest.mark.parametrize(("name", "doc"), RAY_DOCS)
def test_manifest_matches_its_crd(name: str, doc: Doc, crd_schemas: dict[str, CrdSchema]) -> None:
    assert crd_schemas[doc["kind"]].problems(doc) == []


def _head(doc: Doc) -> Doc:
    return cluster_spec(doc)["headGroupSpec"]


def _worker(doc: Doc) -> Doc:
    return cluster_spec(doc)["workerGroupSpecs"][0]


def _ray_container(group: Doc) -> Doc:
    return group["template"]["spec"]["containers"][0]


# (how to break a manifest, text the reported problem must contain)
BREAKAGES: list[Any] = [
    pytest.param(
        lambda d: _head(d).update(serviceTyp="ClusterIP"),
        "headGroupSpec.serviceTyp: unknown field",
        id="unknown-field-in-head-group",
    ),
    pytest.param(
        lambda d: _ray_container(_worker(d)).update(volumeMount=[]),
        "containers[0].volumeMount: unknown field",
        id="unknown-field-in-container",
    ),
    pytest.param(
        lambda d: _ray_container(_head(d))["securityContext"].update(runAsUsr=1000),
        "securityContext.runAsUsr: unknown field",
        id="unknown-field-in-security-context",
    ),
    pytest.param(
        lambda d: _worker(d).update(replicas="two"),
        "workerGroupSpecs[0].replicas: 'two' is not of type 'integer'",
        id="replicas-as-string",
    ),
    pytest.param(
        lambda d: cluster_spec(d).update(rayVersion=260),
        "rayVersion: 260 is not of type 'string'",
        id="rayVersion-as-number",
    ),
    pytest.param(
        lambda d: _ray_container(_head(d))["resources"]["limits"].update(memory="8 GB"),
        "resources.limits.memory: '8 GB' does not match",
        id="malformed-quantity",
    ),
    pytest.param(
        lambda d: _worker(d).pop("groupName"),
        "'groupName' is a required property",
        id="missing-required-field",
    ),
    pytest.param(
        lambda d: cluster_spec(d)["authOptions"].update(mode="password"),
        "authOptions.mode: 'password' is not one of",
        id="value-outside-enum",
    ),
]


@pytest.mark.parametrize(("break_it", "expected"), BREAKAGES)
@pytest.mark.parametrize(("name", "doc"), RAY_DOCS)
def test_broken_copy_is_rejected(
    name: str,
    doc: Doc,
    break_it: Callable[[Doc], object],
    expected: str,
    crd_schemas: dict[str, CrdSchema],
) -> None:
    broken = copy.deepcopy(doc)
    break_it(broken)
    problems = crd_schemas[doc["kind"]].problems(broken)
    assert any(expected in problem for problem in problems), problems


RAYJOB_DOCS = [p for p in RAY_DOCS if p.values[1]["kind"] == "RayJob"]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("shutdownAfterJobFinishes", "yes", "shutdownAfterJobFinishes: 'yes' is not of type"),
        ("backoffLimit", "2", "backoffLimit: '2' is not of type 'integer'"),
        ("entrypointCommand", "python x.py", "spec.entrypointCommand: unknown field"),
    ],
)
@pytest.mark.parametrize(("name", "doc"), RAYJOB_DOCS)
def test_broken_rayjob_is_rejected(
    name: str, doc: Doc, field: str, value: Any, expected: str, crd_schemas: dict[str, CrdSchema]
) -> None:
    broken = copy.deepcopy(doc)
    broken["spec"][field] = value
    problems = crd_schemas["RayJob"].problems(broken)
    assert any(expected in problem for problem in problems), problems


# ---------------------------------------------------------------- versions agree


def pinned_ray_version() -> str:
    """X in `ray[default,train]==X` of pyproject.toml's [project] dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (ray,) = [r for r in map(Requirement, project["dependencies"]) if r.name == "ray"]
    assert {"default", "train"} <= ray.extras, str(ray)
    (pin,) = ray.specifier
    assert pin.operator == "==", f"ray must be pinned exactly, not {ray}"
    return pin.version


def dockerfile_base_tag() -> str:
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{BASE_TAG\}\s*$", text, re.M), "FROM line"
    match = re.search(r"^ARG BASE_TAG=(\S+)\s*$", text, re.M)
    assert match, "no `ARG BASE_TAG=<default>` in cluster/Dockerfile"
    return match.group(1)


def test_image_manifests_and_pyproject_agree_on_ray_version() -> None:
    ray_version = pinned_ray_version()
    base_tag = dockerfile_base_tag()  # e.g. 2.60.0-py311
    assert base_tag.split("-")[0] == ray_version, (base_tag, ray_version)
    assert not base_tag.endswith("-gpu"), "the default build is the CPU image"
    for name, docs in MANIFESTS.items():
        image_tag = base_tag + ("-gpu" if is_gpu_manifest(name) else "")
        for doc in docs:
            if doc["kind"] not in CRD_FILES:
                continue
            assert cluster_spec(doc)["rayVersion"] == ray_version, name
            for where, container in all_containers(doc):
                repository, _, tag = container["image"].rpartition(":")
                assert repository.endswith("raymb"), (name, where, container["image"])
                assert tag == image_tag, (name, where, container["image"])


# ---------------------------------------------------------------- what the pods rely on


@pytest.mark.parametrize(("name", "doc"), RAY_DOCS)
def test_ray_containers_start_in_the_image_repo_copy(name: str, doc: Doc) -> None:
    """Job entrypoints name repo files relatively (`python jobs/train.py ...`)."""
    match = re.search(r"^WORKDIR (\S+)\s*$", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert match, "no WORKDIR in cluster/Dockerfile"
    for group, template in ray_pod_templates(doc):
        for container in template["spec"]["containers"]:
            assert container.get("workingDir") == match.group(1), (group, container["name"])


@pytest.mark.parametrize(("name", "doc"), RAY_DOCS)
def test_requests_equal_limits(name: str, doc: Doc) -> None:
    for where, container in all_containers(doc):
        resources = container.get("resources", {})
        limits = resources.get("limits", {})
        assert {"cpu", "memory"} <= limits.keys(), where
        assert resources.get("requests") == limits, where


@pytest.mark.parametrize(("name", "doc"), RAY_DOCS)
def test_ray_pods_mount_memory_shm_and_run_storage(name: str, doc: Doc) -> None:
    """Run storage is the claim, except in the bucket variants (which must not mount it)."""
    expected = {"shm"} if is_bucket_manifest(name) else {"shm", "runs"}
    for group, template in ray_pod_templates(doc):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        by_source = {}
        for volume in volumes.values():
            if volume.get("emptyDir", {}).get("medium") == "Memory":
                by_source["shm"] = volume["name"]
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim == RUNS_CLAIM:
                by_source["runs"] = volume["name"]
        assert by_source.keys() == expected, (group, volumes)
        for container in template["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts.get("/dev/shm") == by_source["shm"], (group, container["name"])
            assert mounts.get(RUNS_MOUNT) == by_source.get("runs"), (group, container["name"])


def _walk(value: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(path, key, value) of every mapping entry, at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield path, key, item
            yield from _walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")


def test_services_are_cluster_ip_only() -> None:
    for name, docs in MANIFESTS.items():
        for doc in docs:
            assert doc["kind"] != "Service" or doc["spec"].get("type", "ClusterIP") == "ClusterIP"
            for path, key, value in _walk(doc):
                assert not (key == "serviceType" and value != "ClusterIP"), (name, path)
                assert not (key == "enableIngress" and value), (name, path)
                if key == "headService":
                    assert value.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", name
            if doc["kind"] in CRD_FILES:
                assert cluster_spec(doc)["headGroupSpec"]["serviceType"] == "ClusterIP", name


@pytest.mark.parametrize(("name", "doc"), RAY_DOCS)
def test_pods_run_unprivileged(name: str, doc: Doc) -> None:
    templates = [template for _, template in ray_pod_templates(doc)]
    if doc["kind"] == "RayJob":
        templates.append(doc["spec"]["submitterPodTemplate"])
    for template in templates:
        pod = template["spec"]
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        assert not any("hostPath" in volume for volume in pod.get("volumes", [])), name
        assert pod.get("securityContext", {}).get("runAsNonRoot") is True, name
    for where, container in all_containers(doc):
        context = container.get("securityContext", {})
        assert context.get("allowPrivilegeEscalation") is False, where
        assert context.get("privileged") is False, where
        assert context.get("runAsNonRoot") is True, where
        assert context.get("runAsUser") == 1000, where  # `ray` in the rayproject/ray image


@pytest.mark.parametrize(("name", "doc"), RAY_DOCS)
def test_gpu_variants_and_only_they_request_gpus(name: str, doc: Doc) -> None:
    gpu_workers = []
    for where, container in all_containers(doc):
        resources = container["resources"]
        gpus = resources["limits"].get("nvidia.com/gpu")
        if gpus is not None:
            assert int(gpus) >= 1, where
            assert resources["requests"].get("nvidia.com/gpu") == gpus, where
            gpu_workers.append(where)
    if is_gpu_manifest(name):
        assert gpu_workers, name
        assert not any(w.startswith(("head/", "submitter/")) for w in gpu_workers), gpu_workers
    else:
        assert gpu_workers == [], name


def test_run_storage_claim() -> None:
    docs = [doc for docs in MANIFESTS.values() for doc in docs]
    claims = [doc for doc in docs if doc["kind"] == "PersistentVolumeClaim"]
    assert [doc["metadata"]["name"] for doc in claims] == [RUNS_CLAIM]
    (claim,) = claims
    assert claim["apiVersion"] == "v1"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # head and workers write at once
    assert claim["spec"]["resources"]["requests"]["storage"]


# ---------------------------------------------------------------- RayJob entrypoints


def parse_entrypoint(entrypoint: str) -> tuple[list[str], dict[str, str], list[str]]:
    """(the command, its --option values, the --set overrides in order)."""
    argv = shlex.split(entrypoint)
    command, options, overrides = [], {}, []
    args = iter(argv)
    for arg in args:
        if arg == "--set":
            overrides.append(next(args))
        elif arg.startswith("--"):
            options[arg] = next(args)
        else:
            command.append(arg)
    return command, options, overrides


@pytest.mark.parametrize(("name", "doc"), RAYJOB_DOCS)
def test_rayjob_runs_once_resumably_and_cleans_up(name: str, doc: Doc) -> None:
    spec = doc["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1  # retries resume from the checkpoints on the claim
    command, options, overrides = parse_entrypoint(spec["entrypoint"])
    assert command == ["python", "jobs/train.py"]
    assert options["--name"], "a fixed run name is what lets a retry resume"
    if not is_bucket_manifest(name):  # else test_bucket_rayjob_keeps_run_and_data_in_the_bucket
        assert f"run.storage_path={RUNS_MOUNT}" in overrides
    expected_config = "gpu_mlp.toml" if is_gpu_manifest(name) else "mlp_classify.toml"
    assert options["--config"] == f"jobs/configs/{expected_config}"


@pytest.mark.parametrize(("name", "doc"), RAYJOB_DOCS)
def test_rayjob_config_exists_and_loads(name: str, doc: Doc) -> None:
    import raymb

    command, options, overrides = parse_entrypoint(doc["spec"]["entrypoint"])
    assert (REPO / command[1]).is_file(), command[1]
    config_path = REPO / options["--config"]
    assert config_path.is_file(), options["--config"]
    raymb.load_config(config_path)
    config = raymb.load_config(config_path, overrides)
    if is_bucket_manifest(name):
        for path in (config.run.storage_path, config.data.train, config.data.val):
            assert path.startswith("s3://"), path
    else:
        assert config.run.storage_path == RUNS_MOUNT


# ---------------------------------------------------------------- runs and data in a bucket

BUCKET_DOCS = [p for p in RAY_DOCS if is_bucket_manifest(p.values[0])]
# Env names that hold a credential: only ever from a Secret, never as a `value:` in a manifest.
CREDENTIAL_WORDS = ("KEY", "SECRET", "TOKEN")
S3_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def test_bucket_variants_exist() -> None:
    """The glob above finds them, so every check of RAY_DOCS (the CRDs included) covers them."""
    found = {p.values[0] for p in BUCKET_DOCS}
    assert {"rayjob-s3.yaml", "raycluster-s3.yaml"} <= found, found


def credential_problems(doc: Doc, *, require: tuple[str, ...] = ()) -> list[str]:
    """Where a container's env gives a credential other than through a Secret's key, and which
    Ray containers lack one of `require`; the submitter needs none."""
    found = []
    ray_containers = {
        f"{group}/{c['name']}"
        for group, template in ray_pod_templates(doc)
        for c in template["spec"]["containers"]
    }
    for where, container in all_containers(doc):
        env = {e["name"]: e for e in container.get("env", [])}
        for name, entry in env.items():
            if not any(word in name.upper() for word in CREDENTIAL_WORDS):
                continue
            if "value" in entry:
                found.append(f"{where}: {name} has an inline value")
            elif "secretKeyRef" not in entry.get("valueFrom", {}):
                found.append(f"{where}: {name} does not come from a secretKeyRef")
        if where not in ray_containers:
            continue
        for name in require:
            ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                found.append(f"{where}: no {name} from a secretKeyRef")
            elif ref.get("optional"):
                found.append(f"{where}: {name} is optional (a missing Secret would go unnoticed)")
    return found


@pytest.mark.parametrize(("name", "doc"), RAY_DOCS)
def test_credentials_come_only_from_secrets(name: str, doc: Doc) -> None:
    require = S3_CREDENTIALS if is_bucket_manifest(name) else ()
    assert credential_problems(doc, require=require) == []


def _env(container: Doc) -> list[Doc]:
    return container.setdefault("env", [])


# (how to break a bucket manifest, text the reported problem must contain)
CREDENTIAL_BREAKAGES: list[Any] = [
    pytest.param(
        lambda d: _env(_ray_container(_worker(d)))[1].update(value="s3cr3t"),
        "AWS_SECRET_ACCESS_KEY has an inline value",
        id="inline-secret-value",
    ),
    pytest.param(
        lambda d: _env(_ray_container(_head(d))).append({"name": "HF_TOKEN", "value": "hf_x"}),
        "HF_TOKEN has an inline value",
        id="another-inline-token",
    ),
    pytest.param(
        lambda d: _env(_ray_container(_head(d)))[0].update(
            valueFrom={"configMapKeyRef": {"name": "raymb-s3", "key": "AWS_ACCESS_KEY_ID"}}
        ),
        "AWS_ACCESS_KEY_ID does not come from a secretKeyRef",
        id="key-from-a-configmap",
    ),
    pytest.param(
        lambda d: _ray_container(_worker(d)).pop("env"),
        "no AWS_ACCESS_KEY_ID from a secretKeyRef",
        id="worker-without-credentials",
    ),
]


@pytest.mark.parametrize(("break_it", "expected"), CREDENTIAL_BREAKAGES)
@pytest.mark.parametrize(("name", "doc"), BUCKET_DOCS)
def test_broken_credentials_are_found(
    name: str, doc: Doc, break_it: Callable[[Doc], object], expected: str
) -> None:
    broken = copy.deepcopy(doc)
    break_it(broken)
    problems = credential_problems(broken, require=S3_CREDENTIALS)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(("name", "doc"), BUCKET_DOCS)
def test_bucket_manifests_never_touch_the_runs_claim(name: str, doc: Doc) -> None:
    for path, key, value in _walk(doc):
        assert not (key == "claimName" and value == RUNS_CLAIM), (name, path)
        assert not (key == "mountPath" and value == RUNS_MOUNT), (name, path)


@pytest.mark.parametrize(("name", "doc"), BUCKET_DOCS)
def test_credentials_secret_is_not_the_auth_token_secret(name: str, doc: Doc) -> None:
    """KubeRay keeps a RayCluster's auth token in a Secret named after the cluster (a RayJob's
    cluster gets a generated name): a credentials Secret of that name would collide."""
    secrets = {
        value["name"] for _, key, value in _walk(doc) if key in ("secretKeyRef", "secretRef")
    }
    assert secrets, name
    if doc["kind"] == "RayCluster":
        assert doc["metadata"]["name"] not in secrets, secrets


@pytest.mark.parametrize(
    ("name", "doc"), [p for p in BUCKET_DOCS if p.values[1]["kind"] == "RayJob"]
)
def test_bucket_rayjob_keeps_run_and_data_in_the_bucket(name: str, doc: Doc) -> None:
    import raymb

    _, options, overrides = parse_entrypoint(doc["spec"]["entrypoint"])
    given = dict(o.split("=", 1) for o in overrides)
    for key in ("run.storage_path", "data.train", "data.val"):
        assert given.get(key, "").startswith("s3://"), (key, given.get(key))
    config = raymb.load_config(REPO / options["--config"], overrides)
    # Several nodes: a lost one restarts the run from its checkpoint in the bucket.
    assert config.scale.max_failures > 0
    assert config.train.sync == "grad" or not config.scale.elastic


@pytest.mark.parametrize(("name", "doc"), RAYJOB_DOCS)
def test_jobs_train_accepts_the_entrypoint(name: str, doc: Doc) -> None:
    """jobs/train.py's own checks, before it joins Ray, pass for what the RayJob gives it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("jobs_train", REPO / "jobs" / "train.py")
    assert spec and spec.loader
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    command, _, _ = parse_entrypoint(doc["spec"]["entrypoint"])
    argv = shlex.split(doc["spec"]["entrypoint"])[len(command) :]
    config = train._load(train._parser().parse_args(argv))
    train._check_storage(config.run.storage_path)
