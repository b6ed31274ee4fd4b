"""``baton serve --config`` / KubeRay ``serveConfigV2`` pool settings reach the worker pools' config."""

from __future__ import annotations

import pytest
from baton.cluster.serve_config import ServeConfig
from baton.router.cluster_adapter import pool_config
from pydantic import ValidationError


def test_pool_settings_map_onto_pool_config() -> None:
    cfg = ServeConfig.model_validate(
        {
            "pools": {
                "mode": "disaggregated",
                "transport": "gloo",
                "short_prompt_tokens": 12,
                "orphan_timeout_s": 30,
                "ipc_arena_mib": 0,
                "prefill": {"replicas": 2},
                "decode": {"replicas": 3},
            }
        }
    )
    pc = pool_config(cfg)
    assert (pc.num_prefill, pc.num_decode, pc.transport) == (2, 3, "gloo")
    assert pc.disagg_threshold_tokens == 12 and pc.orphan_timeout_s == 30
    assert pc.ipc_arena_mib == 0  # off: one IPC handle per export
    assert pool_config(ServeConfig()).ipc_arena_mib == 1024


def test_negative_arena_is_rejected_with_the_field_named() -> None:
    with pytest.raises(ValidationError, match="ipc_arena_mib"):
        ServeConfig.model_validate({"pools": {"ipc_arena_mib": -1}})
