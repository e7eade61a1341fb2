"""LangChain's ChatOpenAI and OpenAIEmbeddings, unchanged, against a real ``mlserve serve`` on the real model.

One server for the whole module (started with --embeddings) keeps it fast. What works:
invoke, stream, batch, with_structured_output(method="json_schema" or "json_mode"), and
OpenAIEmbeddings with check_embedding_ctx_length=False. Function calling (tools) is refused
with a 400, never ignored. The server also runs with ``--route-prefix /openai``: one stream goes
through KServe's ``/openai/v1`` path on the real server.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import openai
import pytest
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic import BaseModel

from tests.support.servers import ServerProcess, start_server

pytestmark = pytest.mark.model
MODEL = "gemma3-270m"


class Triage(BaseModel):
    """A structured answer with a required string, an enum and a nested object."""

    complaint: str
    urgency: Literal["low", "medium", "high"]
    vitals: Vitals


class Vitals(BaseModel):
    """Nested in Triage."""

    heart_rate: int


Triage.model_rebuild()


@pytest.fixture(scope="module")
def server(gemma_home: Path) -> Iterator[ServerProcess]:
    with start_server(gemma_home, "--embeddings", "--parallel", "4", "--route-prefix", "/openai") as srv:
        yield srv


def _chat(server: ServerProcess, prefix: str = "", **kwargs: object) -> ChatOpenAI:
    opts: dict[str, object] = {"max_tokens": 24, "temperature": 0, "max_retries": 0, **kwargs}
    return ChatOpenAI(model=MODEL, base_url=server.url + prefix + "/v1", api_key="unused", **opts)  # type: ignore[arg-type]


def test_chat_invoke_stream_batch(server: ServerProcess) -> None:
    llm = _chat(server)
    answer = llm.invoke("Name one symptom of influenza.")
    assert isinstance(answer.content, str) and answer.content.strip()
    assert answer.response_metadata["model_name"] == "gemma3-270m:1"
    assert 0 < answer.usage_metadata["output_tokens"] <= 24  # type: ignore[index]
    # KServe's path (serve --route-prefix /openai): the same client, base_url .../openai/v1.
    chunks = [c.content for c in _chat(server, "/openai").stream("Count from one to five.")]
    assert len([c for c in chunks if c]) > 1 and "".join(map(str, chunks)).strip()  # streamed, not one block
    replies = llm.batch(["Say hello.", "Say goodbye.", "Name a colour."])
    assert len(replies) == 3 and all(isinstance(r.content, str) and r.content.strip() for r in replies)


def test_structured_output(server: ServerProcess) -> None:
    prompt = "A patient reports chest pain with a heart rate of 120. Triage it."
    result = _chat(server, max_tokens=96).with_structured_output(Triage, method="json_schema").invoke(prompt)
    assert isinstance(result, Triage) and result.urgency in ("low", "medium", "high")
    as_json = (
        _chat(server, max_tokens=64)
        .with_structured_output(None, method="json_mode")
        .invoke("Reply with a JSON object with the key 'symptom'.")
    )
    assert isinstance(as_json, dict)
    # Tools are not supported: refused with a 400 that says so, never a reply that ignores them.
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(server).with_structured_output(Triage, method="function_calling").invoke(prompt)
    assert refused.value.status_code == 400


def test_embeddings(server: ServerProcess) -> None:
    # check_embedding_ctx_length=False: LangChain otherwise tokenises with tiktoken (whose vocabulary it
    # downloads) and sends OpenAI token ids, which mean nothing to another model; mlserve refuses them.
    emb = OpenAIEmbeddings(
        model=MODEL, base_url=server.url + "/v1", api_key="unused", check_embedding_ctx_length=False, max_retries=0
    )
    docs = [
        "The patient has a high fever and a sore throat.",
        "The patient reports a raised temperature and throat pain.",
        "Quarterly revenue grew by four percent.",
    ]
    vectors = emb.embed_documents(docs)
    query = emb.embed_query(docs[0])
    assert len(vectors) == 3 and len({len(v) for v in [*vectors, query]}) == 1
    assert all(math.isclose(math.hypot(*v), 1.0, rel_tol=1e-3) for v in vectors)  # L2-normalised

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    assert cos(query, vectors[0]) > 0.99  # the same text embeds the same
