"""Tenants never share prefix cache unless the operator put their keys in one shared namespace."""

from __future__ import annotations

import pytest
import yaml
from serve_harness import router_args, serve_router

SYSTEM = ("You are a helpful assistant. Answer briefly and politely. " * 6).strip()


@pytest.fixture(scope="module")
def router(tiny_model_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "tenants": {
                    "a": {"keys": ["sk-a"]},
                    "b": {"keys": ["sk-b"]},
                    "acme-chat": {"keys": ["sk-acme-chat"], "prefix_namespace": "shared-acme"},
                    "acme-search": {"keys": ["sk-acme-search"], "prefix_namespace": "shared-acme"},
                },
                "admin_keys": ["sk-admin"],
            }
        )
    )
    with serve_router(
        router_args(tiny_model_dir, tenants={"api_keys_file": str(keys)}), admin_key="sk-admin"
    ) as h:
        yield h


def _cached(router, key: str, user: str, system: str = SYSTEM) -> tuple[int, int]:
    with router.client(key) as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "max_tokens": 2,
                "temperature": 0,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": user},
                ],
            },
        )
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        return u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"]


def test_tenants_are_isolated(router) -> None:
    n, first = _cached(router, "sk-a", "What is the capital of France?")
    assert n > 48 and first == 0
    _, b = _cached(router, "sk-b", "What is the capital of France?")
    assert b == 0  # identical prompt, other tenant: no reuse
    _, again = _cached(router, "sk-a", "What is the capital of France?")
    assert again > 0 and again % 16 == 0
    router.assert_no_leak()


def test_shared_namespace_shares(router) -> None:
    system = "Baton serves large language models with disaggregated prefill and decode. " * 5
    _, first = _cached(router, "sk-acme-chat", "def add(a, b):", system)
    assert first == 0
    _, shared = _cached(router, "sk-acme-search", "def add(a, b):", system)
    assert shared > 0  # another tenant, same operator-declared namespace
    _, other = _cached(router, "sk-b", "def add(a, b):", system)
    assert other == 0


def test_admin_purge_drops_a_tenants_cache(router) -> None:
    _cached(router, "sk-a", "purge me please")
    with router.client("sk-admin") as c:
        r = c.post("/admin/cache/purge", json={"namespace": "a"})
        assert r.status_code == 200 and r.json()["worker_blocks_reset"] > 0, r.text
    _, after = _cached(router, "sk-a", "purge me please")
    assert after == 0
    router.assert_no_leak()
