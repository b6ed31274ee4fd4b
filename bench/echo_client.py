"""``EchoClient``: an ``EngineClient`` that answers instantly (echoes prompt tokens), so a benchmark
sees only the router's own cost."""

from __future__ import annotations

from collections.abc import AsyncIterator

from baton.router.client_protocol import Route, WorkerLoad
from baton.workers.messages import GenerateDelta, GenerateRequest


class EchoClient:
    def __init__(self, num_blocks: int = 1 << 20, block_size: int = 16) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size

    async def generate(
        self, request: GenerateRequest, route: Route | None = None
    ) -> AsyncIterator[GenerateDelta]:
        n = min(request.params.max_tokens, len(request.prompt_token_ids))
        yield GenerateDelta(
            request.request_id,
            tuple(request.prompt_token_ids[:n]),
            "",
            finish_reason="length",
            num_prompt_tokens=len(request.prompt_token_ids),
            worker_id="echo-0",
        )

    async def abort(self, request_id: str) -> None:
        return None

    async def health(self) -> bool:
        return True

    async def stats(self) -> list[WorkerLoad]:
        return [
            WorkerLoad(
                "echo-0",
                "colocated",
                True,
                num_total_blocks=self.num_blocks,
                num_free_blocks=self.num_blocks,
                block_size=self.block_size,
            )
        ]

    async def reset_prefix_cache(self, namespace: str | None = None) -> int:
        return 0

    async def close(self) -> None:
        return None
