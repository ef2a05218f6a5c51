"""`deploy/`: the `ray up` cluster and the KubeRay RayJob run commands this project accepts.

Each file is parsed; the `python -m orchestrator ...` command it runs is composed and validated
with the project's own config (a renamed or removed key fails here), and the pieces it names
agree with each other (the MLflow service's port, the bucket, the credentials every pod gets).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from orchestrator.config.compose import compose
from orchestrator.config.validate import validate

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _config(command: str):
    words = shlex.split(command)
    at = words.index("orchestrator")
    assert words[at - 2:at] == ["python", "-m"], command
    return validate(compose(words[at + 1:]))


def test_ray_up_cluster_and_its_job_command():
    text = (DEPLOY / "ray-cluster.yaml").read_text()
    spec = yaml.safe_load(text)
    assert spec["head_node_type"] in spec["available_node_types"]
    assert any("ray start --head" in c for c in spec["head_start_ray_commands"])
    # The submit command in the opening comment (continued over two lines with a backslash).
    comment = "\n".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))
    submit = re.search(r"ray job submit .*?-- \\\n(python -m orchestrator [^\n]+)", comment)
    assert submit, "no `ray job submit ... -- python -m orchestrator ...` in the comment"
    cfg = _config(submit.group(1))
    assert cfg.cluster.address == "auto" and cfg.tracking.uri.startswith("http://")
    assert cfg.cluster.storage.startswith("s3://") and cfg.cluster.checkpoint_dir is None
    assert "qlora-orchestrator[s3]" in " ".join(spec["setup_commands"])  # s3fs on every node
    # Nothing that takes jobs or runs listens where a network reaches it unauthenticated.
    head = " ".join(spec["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    server = re.search(r"(mlflow server [^\n]+)", comment).group(1)
    assert "--app-name basic-auth" in server
    for node in spec["available_node_types"].values():  # every node may write to the bucket
        assert node["node_config"]["IamInstanceProfile"]["Name"]


def test_kuberay_rayjob_with_an_mlflow_server():
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "rayjob.yaml").read_text())}
    assert set(docs) == {"Deployment", "Service", "RayJob", "PersistentVolumeClaim"}
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    cfg = _config(job["spec"]["entrypoint"])
    service = docs["Service"]
    assert cfg.tracking.uri == (f"http://{service['metadata']['name']}:"
                                f"{service['spec']['ports'][0]['port']}")
    server = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert server[:2] == ["mlflow", "server"]
    assert server[server.index("--artifacts-destination") + 1].startswith("s3://")
    assert str(service["spec"]["ports"][0]["targetPort"]) == server[server.index("--port") + 1]
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"],
            *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    bucket = server[server.index("--artifacts-destination") + 1].split("/")[2]
    assert cfg.cluster.storage.startswith(f"s3://{bucket}/")
    secret = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    for pod in pods:  # every Ray pod reads and writes the checkpoints with the server's keys
        for container in pod["containers"]:
            assert secret[0] in container["envFrom"]  # s3-credentials
    gpus = [c["resources"]["limits"]["nvidia.com/gpu"] for g in cluster["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]
    assert all(n >= 1 for n in gpus)


def test_kuberay_services_are_authenticated_and_the_store_on_a_volume():
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "rayjob.yaml").read_text())}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [mlflow] = pod["containers"]
    command = mlflow["command"]
    # Listening on the pod network, so with MLflow's basic auth on.
    assert command[command.index("--app-name") + 1] == "basic-auth"
    store = command[command.index("--backend-store-uri") + 1].removeprefix("sqlite:///")
    [mount] = [m for m in mlflow["volumeMounts"] if store.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == \
        docs["PersistentVolumeClaim"]["metadata"]["name"]
    cluster = docs["RayJob"]["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "127.0.0.1"
    pods = [cluster["headGroupSpec"]["template"]["spec"],
            *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    for spec in pods:  # Ray's token auth on every pod, the token from a secret
        for container in spec["containers"]:
            assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
            assert {"secretRef": {"name": "ray-auth-token"}} in container["envFrom"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "mlflow-credentials"}} in head["envFrom"]  # the driver logs in
