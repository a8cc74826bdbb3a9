"""What the Ray features share: the missing-extra error, the actors' threads and device from the
resources Ray assigned, CPUs per actor, and Ray's errors unwrapped to bnfold's."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import bnfold
from bnfold.on_ray import cluster
from bnfold.on_ray.actor import InputColumns, PredictionActor
from bnfold.on_ray.cluster import bnfold_cause, default_cpus_per_actor, require_ray
from bnfold.on_ray.rows import PredictionRows


def test_without_ray_every_scale_name_is_a_usage_error_naming_the_extra(monkeypatch):
    import bnfold.on_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    for name in ("predict_dataset", "write_predictions", "ray_instance"):
        with pytest.raises(
            bnfold.UsageError, match=r"^running on Ray needs Ray Data, .*: pip install 'bnfold\[ray\]'$"
        ):
            getattr(bnfold.on_ray, name)
    with pytest.raises(bnfold.UsageError, match=r"bnfold\[ray\]"):
        require_ray()


def test_an_actor_runs_onnx_runtime_on_the_cpus_and_the_gpu_ray_assigned(ray_cluster, shapes_onnx):
    import ray

    predictor = bnfold.Predictor(shapes_onnx, device="cpu")
    rows = PredictionRows.for_model(predictor, [np.zeros((1, 4), np.float32)], 1)

    def session_of_an_actor() -> tuple[int, list[str]]:
        actor = PredictionActor(str(shapes_onnx), rows, InputColumns("item", "tensors", ("x",)))
        return actor.predictor.session.get_session_options().intra_op_num_threads, actor.predictor.providers

    for cpus in (1, 2):
        threads, providers = ray.get(ray.remote(num_cpus=cpus)(session_of_an_actor).remote())
        assert threads == cpus and providers == ["CPUExecutionProvider"]  # even where GPUs are visible
    if ray.cluster_resources().get("GPU"):  # a GPU machine: given one, the actor runs on CUDA
        _, providers = ray.get(ray.remote(num_cpus=1, num_gpus=1)(session_of_an_actor).remote())
        assert providers[0] == "CUDAExecutionProvider"


def test_cpus_per_actor_share_the_cluster_within_one_node():
    nodes = [{"CPU": 8.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 0.0}]
    assert default_cpus_per_actor(1, nodes) == 8  # one node's at most
    assert default_cpus_per_actor(4, nodes) == 4
    assert default_cpus_per_actor(64, nodes) == 1  # at least one


def test_a_bnfold_error_raised_in_a_worker_is_found_in_rays_error(ray_cluster):
    import ray

    def fails() -> None:
        raise bnfold.ModelLoadError("m.onnx cannot be loaded")

    with pytest.raises(Exception) as caught:
        ray.get(ray.remote(fails).remote())
    cause = bnfold_cause(caught.value)
    assert isinstance(cause, bnfold.ModelLoadError) and str(cause) == "m.onnx cannot be loaded"
    assert bnfold_cause(ValueError("other")) is None


class FakeRay:
    """Records how ``ray.init`` was called, and whether Ray then saw itself without cluster
    support (which gives a new node the address 127.0.0.1)."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict, bool]] = []

    def init(self, **options) -> None:
        from ray._private import ray_constants

        self.calls.append((options, ray_constants.ENABLE_RAY_CLUSTER))

    def is_initialized(self) -> bool:
        return False

    def shutdown(self) -> None:
        pass


@pytest.mark.parametrize(
    ("address", "env", "local"), [(None, None, True), ("auto", None, False), (None, "10.0.0.1:6379", False)]
)
def test_only_a_new_local_instance_is_started_on_loopback_without_metrics(monkeypatch, address, env, local):
    from ray._private import ray_constants

    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)  # ray.init(address=None) joins it
    ray = FakeRay()
    monkeypatch.setattr(cluster, "require_ray", lambda: ray)
    with cluster.ray_instance(address):
        pass
    ((options, cluster_support),) = ray.calls
    assert options["address"] == address
    assert ("_system_config" in options) is local and cluster_support is not local
    if local:
        assert options["include_dashboard"] is False
        assert options["_system_config"] == {"enable_metrics_collection": False}
    assert ray_constants.ENABLE_RAY_CLUSTER  # as it was
