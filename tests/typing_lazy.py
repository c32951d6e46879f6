"""Type-checked by mypy in CI (tests/test_lazy.py runs it): types flow through @lazy_model.

Nothing here runs at test time; it only has to pass ``mypy --strict`` without ignores.
"""

from __future__ import annotations

import asyncio

from tokguard import LazyModel, lazy_model


class Reranker:
    def predict(self, pairs: list[tuple[str, str]]) -> list[float]:
        return [0.0 for _ in pairs]


@lazy_model
def reranker() -> Reranker:
    return Reranker()


@lazy_model(share_after_fork=True)
def embedder(name: str, dim: int = 8) -> dict[str, int]:
    return {name: dim}


def use() -> None:
    model: Reranker = reranker()
    scores: list[float] = model.predict([("q", "d")])
    preloaded: Reranker = reranker.preload()
    loaded: bool = reranker.loaded()
    reranker.reset()
    table: dict[str, int] = embedder("a")
    table = embedder("a", dim=16)
    table = embedder.preload(name="b")
    embedder.reset("a")
    embedder.reset()
    shared: bool = embedder.share_after_fork
    factory_result: Reranker = reranker.__wrapped__()
    print(scores, preloaded, loaded, table, shared, factory_result)


async def use_async() -> float:
    model: Reranker = await reranker.aget()
    table: dict[str, int] = await embedder.aget("a")
    return model.predict([("q", "d")])[0] + table["a"]


def accepts(model: LazyModel[[], Reranker]) -> Reranker:
    return model()


if __name__ == "__main__":
    accepted: Reranker = accepts(reranker)
    result: float = asyncio.run(use_async())
