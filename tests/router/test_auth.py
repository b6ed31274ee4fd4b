"""Keys → tenants on a real Serve router: 401 for missing/unknown keys, admin keys only for /admin."""

from __future__ import annotations

import hashlib

import pytest
import yaml
from baton.router.auth import Authenticator, KeysFile, bearer_key
from serve_harness import router_args, serve_router

KEYS = {
    "tenants": {
        "acme-chat": {"keys": ["sk-acme-1"], "prefix_namespace": "shared-acme"},
        "globex": {"keys": ["sk-globex-1", "sk-globex-2"]},
    },
    "admin_keys": ["sk-admin"],
}


def test_keys_are_held_hashed_and_map_to_namespaces() -> None:
    auth = Authenticator(KeysFile.model_validate(KEYS))
    held = repr(auth.__dict__)
    assert "sk-acme-1" not in held
    assert hashlib.sha256(b"sk-acme-1").hexdigest() not in held  # digests, as bytes
    a = auth.authenticate("sk-acme-1")
    assert a is not None and (a.name, a.namespace) == ("acme-chat", "shared-acme")
    g = auth.authenticate("sk-globex-2")
    assert g is not None and (g.name, g.namespace) == ("globex", "globex")
    assert auth.authenticate("sk-nope") is None and auth.authenticate(None) is None
    assert auth.authenticate("sk-admin").admin


def test_keys_file_errors_name_the_field(tmp_path) -> None:
    bad = tmp_path / "k.yaml"
    bad.write_text(yaml.safe_dump({"tenants": {"x": {"keys": []}}}))
    with pytest.raises(ValueError, match="tenants.x.keys"):
        Authenticator.from_file(bad)
    dup = tmp_path / "d.yaml"
    dup.write_text(yaml.safe_dump({"tenants": {"a": {"keys": ["k"]}, "b": {"keys": ["k"]}}}))
    with pytest.raises(ValueError, match="also listed"):
        Authenticator.from_file(dup)


def test_dev_mode_without_keys_file() -> None:
    auth = Authenticator.from_file(None)
    t = auth.authenticate(None)
    assert auth.dev_mode and t is not None and t.name == "dev"


def test_bearer_parsing() -> None:
    assert bearer_key("Bearer sk-1") == "sk-1"
    assert bearer_key("bearer  sk-2 ") == "sk-2"
    assert bearer_key("Basic abc") is None
    assert bearer_key(None, "sk-3") == "sk-3"


@pytest.fixture(scope="module")
def router(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(yaml.safe_dump(KEYS))
    with serve_router(
        router_args(tiny_model_dir, tenants={"api_keys_file": str(path)}), admin_key="sk-admin"
    ) as h:
        yield h


def _complete(c, **kw):
    body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 3, "temperature": 0}
    body.update(kw)
    return c.post("/v1/completions", json=body)


def test_http_auth(router) -> None:
    for key in (None, "sk-wrong", "sk-admin"):  # admin keys do not generate
        with router.client(key) as c:
            r = _complete(c)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["type"] == "authentication_error"
            assert c.get("/v1/models").status_code == 401
    with router.client("sk-globex-1") as c:
        r = _complete(c)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"
        assert c.post("/admin/cache/purge").status_code == 401  # tenants are not admins
    with router.client("sk-acme-1") as c:
        assert c.get("/health").status_code == 200  # health needs no key
    with router.client("sk-admin") as c:
        r = c.post("/admin/cache/purge", json={"namespace": "globex"})
        assert r.status_code == 200, r.text
        assert r.json()["namespace"] == "globex"
    router.assert_no_leak()
