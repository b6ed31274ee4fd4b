"""The error table on a real Serve router: each refusal is the right status with a JSON body, never
a 5xx, and nothing leaks (the engine's block accounting is checked afterwards)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from serve_harness import router_args, serve_router

LIMITED = "sk-limited"


@pytest.fixture(scope="module")
def router(tiny_model_dir, tmp_path_factory):
    import yaml

    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "tenants": {"t": {"keys": ["sk-t"]}, "limited": {"keys": [LIMITED]}},
                "admin_keys": ["sk-admin"],
            }
        )
    )
    args = router_args(
        tiny_model_dir,
        tenants={"api_keys_file": str(keys)},
        server={"max_body_bytes": 8192},
        admission={
            "max_queue_per_tenant": 2,
            "queue_timeout_s": 60,
            "tenant_limits": {"limited": {"max_concurrency": 1}},
        },
    )
    with serve_router(args, admin_key="sk-admin") as h:
        yield h


def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()["error"]


def test_error_table(router) -> None:
    with router.client("sk-t") as c:
        # 401
        with router.client() as anon:
            assert _err(anon.post("/v1/completions", json={}), 401)["code"] == "invalid_api_key"
        # 400: context overflow with the three numbers
        e = _err(
            c.post(
                "/v1/completions", json={"model": "tiny", "prompt": "fox " * 200, "max_tokens": 100}
            ),
            400,
        )
        assert e["code"] == "context_length_exceeded"
        assert e["max_tokens"] == 100 and e["max_model_len"] == 256 and e["prompt_tokens"] > 156
        # ... and truncation only when asked, said in the response
        r = c.post(
            "/v1/completions",
            json={
                "model": "tiny",
                "prompt": "fox " * 200,
                "max_tokens": 4,
                "truncate_prompt_tokens": 32,
            },
        )
        assert r.status_code == 200 and r.json()["truncated"] is True
        assert r.json()["usage"]["prompt_tokens"] == 32
        # 400: bad fields, named
        assert _err(c.post("/v1/completions", content=b"{not json"), 400)["param"] is None
        e = _err(
            c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": -1}), 400
        )
        assert e["param"] == "temperature"
        e = _err(
            c.post(
                "/v1/chat/completions",
                json={
                    "model": "tiny",
                    "messages": [
                        {"role": "user", "content": "hi"},
                        {"role": "robot", "content": "x"},
                    ],
                },
            ),
            400,
        )
        assert e["param"] == "messages.1.role"
        assert (
            _err(c.post("/v1/chat/completions", json={"model": "tiny"}), 400)["param"] == "messages"
        )
        assert (
            _err(c.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2, 10**7]}), 400)[
                "param"
            ]
            == "prompt"
        )
        assert (
            _err(
                c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "top_k": -5}), 400
            )["param"]
            == "top_k"
        )
        # 404: unknown model
        assert (
            _err(c.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)["param"]
            == "model"
        )
        # 413: oversized body
        e = _err(c.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 20000}), 413)
        assert e["limit_bytes"] == 8192
    router.assert_no_leak()


def test_queue_full_429_with_retry_after_and_disconnect_aborts(router) -> None:
    body = {
        "model": "tiny",
        "prompt": "Once upon a time",
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
    }
    statuses: list[int] = []
    with (
        router.client(LIMITED) as c,
        c.stream("POST", "/v1/completions", json={**body, "stream": True}) as hold,
    ):
        assert hold.status_code == 200
        lines = hold.iter_lines()
        assert next(lines).startswith("data: ")  # admitted and streaming: the slot is taken

        def queued() -> None:
            with router.client(LIMITED, timeout=120) as q:
                statuses.append(
                    q.post("/v1/completions", json={**body, "max_tokens": 2}).status_code
                )

        waiters = [threading.Thread(target=queued) for _ in range(2)]
        for t in waiters:
            t.start()
        deadline = time.monotonic() + 20
        while router.admin_stats()["queued"] < 2:
            assert time.monotonic() < deadline, "the two requests never queued"
            time.sleep(0.05)
        r = c.post("/v1/completions", json=body)
        e = _err(r, 429)
        assert e["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
        # leaving the stream early (client disconnect) must abort it and let the queue drain
    for t in waiters:
        t.join(60)
    assert statuses == [200, 200]
    st = router.assert_no_leak()
    assert st["rejections"].get("queue_full") == 1
    with router.client("sk-t") as c:
        m = c.get("/metrics").text
    assert 'vllm:request_success_total{finished_reason="abort",model_name="tiny"} 1.0' in m
    assert (
        'baton:requests_rejected_total{model_name="tiny",reason="queue_full",tenant="limited"} 1.0'
    ) in m
