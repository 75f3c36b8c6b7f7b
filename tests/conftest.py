"""Shared fixtures. ``ray_session``: ONE Ray instance for the whole test session (starting Ray
costs seconds; every test that needs Ray shares it)."""

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # address="local": start a fresh instance even when RAY_ADDRESS is set in the environment
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
