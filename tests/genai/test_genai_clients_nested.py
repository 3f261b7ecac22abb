"""Real instrumentations that nest model-call spans: Anthropic's (around the SDK's own span)
and LangChain's over OpenAI's; each call is counted once, totals equal the server's."""

from __future__ import annotations

import pytest
from genai_support import FakeAPI, Reply, run_ctx

from stroma import RunStatus, execute_step
from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture

anthropic = pytest.importorskip("anthropic")


@pytest.mark.usefixtures("anthropic_instrumented")
async def test_anthropic_instrumentation_over_the_sdk_span_counts_once(api: FakeAPI, capture: TelemetryCapture) -> None:
    api.script(Reply(44, 5, cache_read=10, cache_write=4), Reply(20, 2))
    ctx = run_ctx(capture)
    llm = api.client(anthropic.Anthropic, base_url=api.url, api_key="test-key", max_retries=0)

    def ask(state: None) -> str:
        for _ in range(2):
            llm.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        return "ok"

    result = await execute_step("claude", ask, None, ctx)
    assert result.status is RunStatus.COMPLETED
    assert (result.input_tokens, result.output_tokens) == (api.input_tokens, api.output_tokens) == (64, 7)
    chat_spans = [s for s in capture.spans() if (s.attributes or {}).get("gen_ai.operation.name") == "chat"]
    assert len(chat_spans) >= 2  # may be 4: the SDK's own span nested in the instrumentation's
    import genai_prices

    billed = sum(
        float(
            genai_prices.calc_price(
                genai_prices.Usage(
                    input_tokens=s.input_tokens,
                    output_tokens=s.output_tokens,
                    cache_read_tokens=s.cache_read,
                    cache_write_tokens=s.cache_write,
                ),
                "claude-haiku-4-5",
                provider_id="anthropic",
            ).total_price
        )
        for s in api.served
    )
    assert result.total_cost_usd == pytest.approx(billed, rel=1e-9)
    assert capture.metric_total(n.METRIC_INPUT_TOKENS, stroma_step_id="claude") == 64


langchain_openai = pytest.importorskip("langchain_openai")


@pytest.mark.usefixtures("openai_instrumented", "langchain_instrumented")
async def test_langchain_and_openai_instrumentations_count_each_call_once(
    api: FakeAPI, capture: TelemetryCapture
) -> None:
    api.script(Reply(61, 7, model="gpt-4o-mini-2024-07-18"), Reply(39, 3, model="gpt-4o-mini-2024-07-18"))
    ctx = run_ctx(capture)
    model = langchain_openai.ChatOpenAI(
        model="gpt-4o-mini", base_url=api.url + "/v1", api_key="test-key", max_retries=0
    )

    def chain(state: None) -> str:
        model.invoke("one")
        return str(model.invoke("two").content)

    result = await execute_step("chain", chain, None, ctx)
    assert (result.input_tokens, result.output_tokens) == (api.input_tokens, api.output_tokens) == (100, 10)
    (attempt,) = capture.spans_named("attempt")
    assert len([e for e in attempt.events if e.name == n.EVENT_MODEL_CALL]) == 2
    scopes = {s.instrumentation_scope.name for s in capture.spans() if s.name.startswith("chat")}
    assert any("langchain" in scope for scope in scopes)
