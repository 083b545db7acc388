"""Every cluster config in clusters/ is valid: launcher YAMLs against Ray's own schema, KubeRay manifests
for the installed Ray version."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
FILES = sorted(CLUSTERS.glob("*.yaml"))


def test_there_are_cluster_configs():
    assert len(FILES) >= 3


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_cluster_config_is_valid(path):
    doc = yaml.safe_load(path.read_text())
    if doc.get("apiVersion", "").startswith("ray.io/"):
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayJob", "RayCluster")
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        assert spec["rayVersion"] == ray.__version__
        assert spec["headGroupSpec"]["template"]["spec"]["containers"]
        assert all(g["template"]["spec"]["containers"] for g in spec["workerGroupSpecs"])
        if doc["kind"] == "RayJob":
            assert "raydistill sweep" in doc["spec"]["entrypoint"]
            yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        return
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(doc, schema)
    assert doc["head_node_type"] in doc["available_node_types"]
