"""Read-only smoke test against the real RunPod API (costs nothing: no pod is created).

    RUNPOD_LIVE=1 RUNPOD_API_KEY=<key> .venv/bin/python -m pytest tests/infra/test_infra_live.py -q -m live

It checks that the live API answers what the OpenAPI document (and so the emulator) says it does,
for the read calls the kit makes, and that every GPU type the stacks list exists in the catalog.
"""

from __future__ import annotations

import os

import pytest

from infra.runpod import RunPodClient
from infra.stack_config import list_stacks, load_stack_config
from tests.emulator import spec

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(os.environ.get("RUNPOD_LIVE") != "1", reason="live RunPod test: set RUNPOD_LIVE=1 and RUNPOD_API_KEY"),
]


@pytest.fixture(scope="module")
def rp():
    return RunPodClient()


def test_catalog_knows_every_stack_gpu_and_matches_the_document(rp):
    raw = rp.request("GET", "/v2/catalog/gpus", params={"include": "AVAILABILITY", "product": "POD"})
    assert spec.schema_errors("#/components/schemas/ListGpuTypesResponse", raw) == []
    ids = {g["id"] for g in raw["gpus"]}
    for stack in list_stacks():
        missing = [g for g in load_stack_config(stack).gpu_types if g not in ids]
        assert not missing, f"Pulumi.{stack}.yaml lists GPU types the catalog does not have: {missing}"


def test_read_calls_match_the_document(rp):
    for path, ref, params in [
        ("/v2/pods", "ListPodsResponse", None),
        ("/v2/network-volumes", "ListNetworkVolumesResponse", None),
        ("/v2/catalog/datacenters", "ListDataCentersResponse", None),
        ("/v2/billing/pods", "ListPodBillingResponse", {"bucketSize": "day", "lastN": 2}),
    ]:
        body = rp.request("GET", path, params=params)
        assert spec.schema_errors(f"#/components/schemas/{ref}", body) == [], path
