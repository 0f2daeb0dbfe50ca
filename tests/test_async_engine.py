"""AsyncLLMEngine on its own: concurrent streams, isolation of a failing request, backpressure,
draining."""

from __future__ import annotations

import asyncio
import os

import pytest

from flashpage import LLM, SamplingParams
from flashpage.serving.async_engine import AsyncLLMEngine, EngineOverloaded, EngineUnavailable
from model_fixtures import STORIES

pytestmark = pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")


@pytest.fixture()
def engine():
    llm = LLM(STORIES, kv_cache_memory_bytes=32 << 20, verbose=False)
    e = AsyncLLMEngine(llm.llm_engine, max_waiting_requests=64)
    yield e
    e.shutdown(timeout=5, drain=False)


async def _text(e: AsyncLLMEngine, prompt: str, params: SamplingParams) -> str:
    return "".join([out.outputs[0].text async for out in e.generate(prompt, params)])


def test_a_failing_request_does_not_stop_the_others(engine):
    def broken(output_ids, row):
        if len(output_ids) == 2:
            raise KeyError("processor bug")
        return row

    async def main():
        good = asyncio.create_task(_text(engine, "Once upon a time", SamplingParams(temperature=0, max_tokens=30)))
        bad = asyncio.create_task(_text(engine, "The cat", SamplingParams(temperature=0, max_tokens=30,
                                                                           logits_processors=[broken])))
        refused = asyncio.create_task(_text(engine, "x", SamplingParams(max_tokens=10**6)))
        return await asyncio.gather(good, bad, refused, return_exceptions=True)
    good, bad, refused = asyncio.run(main())
    assert isinstance(bad, KeyError) and good.startswith(", there was a little girl named Lily")
    assert isinstance(refused, str)  # max_tokens beyond the context is capped, not refused (as offline)
    assert engine.num_unfinished() == 0
    later = asyncio.run(_text(engine, "Once upon a time", SamplingParams(temperature=0, max_tokens=30)))
    assert later == good


def test_backpressure_refuses_beyond_the_waiting_limit(engine):
    engine.max_waiting_requests = 2

    async def main():
        params = SamplingParams(temperature=0, max_tokens=8)
        return await asyncio.gather(*(_text(engine, "One day", params) for _ in range(12)), return_exceptions=True)
    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, EngineOverloaded)]
    done = [r for r in results if isinstance(r, str)]
    assert refused and done and len(refused) + len(done) == 12
    assert "max_waiting_requests=2" in str(refused[0])


def test_leaving_a_stream_aborts_and_draining_refuses_new_requests(engine):
    async def leave_early():
        gen = engine.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        async for _ in gen:
            break
        await gen.aclose()
    asyncio.run(leave_early())
    for _ in range(100):
        if engine.num_unfinished() == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert engine.num_unfinished() == 0

    async def drain():
        task = asyncio.create_task(_text(engine, "The cat", SamplingParams(temperature=0, max_tokens=20)))
        await asyncio.sleep(0.05)
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown, 10.0, True)
        with pytest.raises(EngineUnavailable):
            await _text(engine, "x", SamplingParams())
        return await task
    assert len(asyncio.run(drain())) > 0  # the running request finished during the drain
