"""Recorded LLM calls, with the real openai and google-genai clients talking to the scripted server.

Every test runs once per wire format (``wire`` is ``"openai"`` or ``"gemini"``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field, field_validator

from conductor.canonical import digest
from conductor.errors import BackendError, ChecksumMismatch, IntegrityError, InvalidDocument
from conductor.executors.llm import LLMRunner
from conductor.llm import LLMClient, LLMSettings, make_client
from conductor.llm.recording import Recording, RecordingClient, RecordingStore, recorded_request, request_key
from conductor.models import Confidence, Task
from conductor.planner import plan_with_llm
from tests.helpers.llm_server import ScriptedLLM, scripted_llm_server
from tests.llm import conftest
from tests.llm.conftest import ANSWER, MODEL, SYSTEM, Answer

GEMINI_ENV = {"GEMINI_API_KEY": "gm-test-key"}
OTHER_ANSWER = {"title": "Keep the parser", "steps": ["write docs"]}


class AnswerWithNote(BaseModel):
    """Another schema that ``ANSWER`` also satisfies."""

    title: str
    steps: list[str] = Field(min_length=1)
    note: str = ""


@pytest.fixture
def llm() -> Iterator[ScriptedLLM]:
    with scripted_llm_server() as server:
        yield server


@pytest.fixture(params=["openai", "gemini"])
def wire(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(tmp_path: Path) -> RecordingStore:
    return RecordingStore(tmp_path / "recordings")


def base_url(llm: ScriptedLLM, wire: str) -> str:
    return llm.openai_base_url if wire == "openai" else llm.gemini_base_url


def settings(llm: ScriptedLLM, wire: str, **overrides: Any) -> LLMSettings:
    options: dict[str, Any] = {"provider": wire, "model": MODEL, "base_url": base_url(llm, wire),
                               "timeout_seconds": 5.0, "max_retries": 0}
    return LLMSettings(**(options | overrides))


@pytest.fixture
def make(llm: ScriptedLLM, wire: str, store: RecordingStore) -> Callable[..., RecordingClient]:
    """A fresh real client (as a new process would build) wrapped in a RecordingClient over ``store``."""

    def make(*, refresh: bool = False, server: ScriptedLLM | None = None, **overrides: Any) -> RecordingClient:
        inner = make_client(settings(server or llm, wire, **overrides), environ=GEMINI_ENV if wire == "gemini" else {})
        return RecordingClient(inner, store, refresh=refresh)

    return make


def files(store: RecordingStore) -> list[Path]:
    """Every file under the store (temp files included), sorted."""
    return sorted(p for p in store.root.rglob("*") if p.is_file()) if store.root.exists() else []


def ask(client: LLMClient, prompt: str = "split the parser", schema: type[BaseModel] = Answer) -> Any:
    return client.generate(system=SYSTEM, prompt=prompt, schema=schema)


# --- the key ------------------------------------------------------------------------------------


def test_key_is_the_digest_of_exactly_the_documented_fields() -> None:
    config = LLMSettings("openai", MODEL, temperature=0.2)

    key = request_key(config, system=SYSTEM, prompt="p", schema=Answer)

    assert key == digest({"provider": "openai", "model": MODEL, "system": SYSTEM, "prompt": "p",
                          "schema": Answer.model_json_schema(), "temperature": 0.2})


def test_key_ignores_transport_and_prices_but_not_the_answer_fields() -> None:
    def key(schema: type[BaseModel] = Answer, prompt: str = "p", **options: Any) -> str:
        return request_key(LLMSettings(**({"provider": "openai", "model": MODEL} | options)), system=SYSTEM,
                           prompt=prompt, schema=schema)

    same = key(base_url="http://127.0.0.1:1/v1", timeout_seconds=3.0, max_retries=9,
               input_usd_per_million=1.0, output_usd_per_million=2.0)
    assert same == key()
    different = {key(provider="gemini"), key(model="other"), key(temperature=0.0), key(temperature=0.7),
                 key(schema=AnswerWithNote), key(prompt="q"), key()}
    assert len(different) == 7


def test_store_refuses_a_malformed_key(store: RecordingStore) -> None:
    for bad in ("sha256:../../etc", "md5:" + "0" * 64, "sha256:" + "A" * 64):
        with pytest.raises(ValueError, match="not a recording key"):
            store.get(bad)


def test_put_refuses_a_key_that_is_not_its_request(store: RecordingStore) -> None:
    request = recorded_request(LLMSettings("openai", MODEL), system=SYSTEM, prompt="p", schema=Answer)
    recording = Recording(key="sha256:" + "0" * 64, request=request, recorded_at="2026-01-01T00:00:00Z",
                          response={"raw_text": "{}", "model": MODEL, "usage": {}, "duration_seconds": 0.1})

    with pytest.raises(InvalidDocument, match="is not the key of its request"):
        store.put(recording)
    assert files(store) == []


# --- record and replay --------------------------------------------------------------------------


def test_first_call_asks_the_server_and_stores_one_recording(
    make: Callable[..., RecordingClient], llm: ScriptedLLM, store: RecordingStore, wire: str
) -> None:
    llm.reply("split the parser", ANSWER, input_tokens=120, output_tokens=30)
    client = make()

    reply = ask(client)

    assert llm.count("split the parser") == 1
    assert reply.parsed == Answer(**ANSWER) and reply.cached is False
    assert reply.recording == request_key(client.settings, system=SYSTEM, prompt="split the parser", schema=Answer)
    [path] = files(store)
    hexdigest = reply.recording.removeprefix("sha256:")
    assert path == store.root / hexdigest[:2] / f"{hexdigest}.json"
    document = json.loads(path.read_text("utf-8"))
    assert document["schema"] == "conductor.recording/v1" and document["key"] == reply.recording
    assert document["request"] | {"json_schema": None} == {
        "provider": wire, "model": MODEL, "system": SYSTEM, "prompt": "split the parser", "schema_name": "Answer",
        "json_schema": None, "temperature": None,
    }
    assert document["request"]["json_schema"] == Answer.model_json_schema()
    response = document["response"]
    assert json.loads(response["raw_text"]) == ANSWER and response["model"] == MODEL
    assert response["usage"] == {"input_tokens": 120, "output_tokens": 30, "cost_usd": None}
    assert 0.0 < response["duration_seconds"] < 5.0
    assert document["recorded_at"].endswith("Z") and document["checksum"].startswith("sha256:")


def test_identical_call_replays_without_a_request(
    make: Callable[..., RecordingClient], llm: ScriptedLLM, store: RecordingStore
) -> None:
    llm.reply("split the parser", ANSWER, input_tokens=1_000, output_tokens=500)
    first = ask(make(input_usd_per_million=2.0, output_usd_per_million=8.0))

    # a new client over the same folder: a rerun, resume or fork in another process
    second = ask(make(input_usd_per_million=2.0, output_usd_per_million=8.0))

    assert llm.count("split the parser") == 1
    assert second.cached is True and second.recording == first.recording
    assert second.parsed == first.parsed == Answer(**ANSWER)
    assert second.raw_text == first.raw_text and second.model == first.model
    assert second.usage == first.usage and second.usage.cost_usd == pytest.approx(0.006)
    assert second.duration_seconds == 0.0
    assert len(files(store)) == 1


@pytest.mark.parametrize("change", [
    {"prompt": "split the parser, please"},
    {"model": "scripted-model-2"},
    {"temperature": 0.3},
    {"schema": AnswerWithNote},
])
def test_a_different_request_misses(
    make: Callable[..., RecordingClient], llm: ScriptedLLM, store: RecordingStore, change: dict[str, Any]
) -> None:
    llm.reply("split the parser", ANSWER)
    first = ask(make())
    request = {"prompt": change.get("prompt", "split the parser"), "schema": change.get("schema", Answer)}
    client = make(**{k: v for k, v in change.items() if k in ("model", "temperature")})

    second = ask(client, **request)

    assert llm.count("split the parser") == 2
    assert second.cached is False and second.recording != first.recording
    assert len(files(store)) == 2
    assert llm.requests[-1].model == change.get("model", MODEL)


def test_refresh_calls_again_and_replaces_the_recording(
    make: Callable[..., RecordingClient], llm: ScriptedLLM, store: RecordingStore
) -> None:
    llm.reply("split the parser", ANSWER, times=1)
    llm.reply("split the parser", OTHER_ANSWER)
    first = ask(make())

    fresh = ask(make(refresh=True))
    replay = ask(make())

    assert llm.count("split the parser") == 2
    assert fresh.cached is False and fresh.recording == first.recording
    assert fresh.parsed == Answer(**OTHER_ANSWER)
    assert replay.cached is True and replay.parsed == Answer(**OTHER_ANSWER)
    assert len(files(store)) == 1


def test_another_base_url_timeout_or_retries_still_replays(
    make: Callable[..., RecordingClient], llm: ScriptedLLM
) -> None:
    llm.reply("split the parser", ANSWER)
    first = ask(make())

    with scripted_llm_server() as other:  # another port, nothing scripted: any request would fail
        second = ask(make(server=other, timeout_seconds=9.0, max_retries=2))

        assert other.requests == []
    assert llm.count("split the parser") == 1
    assert second.cached is True and second.parsed == first.parsed


def test_a_recorded_answer_the_schema_now_rejects_is_asked_again(
    make: Callable[..., RecordingClient], llm: ScriptedLLM
) -> None:
    class Answer(BaseModel):  # same name and JSON Schema as the conftest's, so the same key
        """The schema the contract tests ask for."""

        title: str
        steps: list[str] = Field(min_length=1)

        @field_validator("title")
        @classmethod
        def no_split(cls, value: str) -> str:
            if "Split" in value:
                raise ValueError("no splitting any more")
            return value

    llm.reply("split the parser", ANSWER, times=1)
    llm.reply("split the parser", OTHER_ANSWER)
    first = ask(make())

    again = ask(make(), schema=Answer)

    assert Answer.model_json_schema() == conftest.Answer.model_json_schema()
    assert again.recording == first.recording
    assert again.cached is False and again.parsed.title == "Keep the parser"
    assert llm.count("split the parser") == 2
    assert ask(make(), schema=Answer).cached is True


# --- damage -------------------------------------------------------------------------------------


def _edit_answer(path: Path) -> None:
    document = json.loads(path.read_text("utf-8"))
    document["response"]["raw_text"] = json.dumps(OTHER_ANSWER)
    path.write_text(json.dumps(document), "utf-8")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(("damage", "error", "message"), [
    (_edit_answer, ChecksumMismatch, "does not match content"),
    (_truncate, InvalidDocument, "invalid JSON"),
])
def test_a_tampered_recording_is_an_integrity_error_naming_the_file(
    make: Callable[..., RecordingClient], llm: ScriptedLLM, store: RecordingStore,
    damage: Callable[[Path], None], error: type[IntegrityError], message: str,
) -> None:
    llm.reply("split the parser", ANSWER)
    ask(make())
    [path] = files(store)
    damage(path)

    with pytest.raises(error, match=message) as caught:
        ask(make())

    assert str(path) in str(caught.value) and "--no-cache" in str(caught.value)
    assert caught.value.exit_code == 5
    assert llm.count("split the parser") == 1  # not silently paid again
    repaired = ask(make(refresh=True))  # what --no-cache does
    assert repaired.cached is False and ask(make()).cached is True


def test_a_recording_under_another_key_is_an_integrity_error(
    make: Callable[..., RecordingClient], llm: ScriptedLLM, store: RecordingStore
) -> None:
    llm.reply("split the parser", ANSWER)
    first = ask(make())
    key = request_key(make().settings, system=SYSTEM, prompt="another prompt", schema=Answer)
    target = store.path(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(store.path(first.recording).read_bytes())

    with pytest.raises(InvalidDocument, match=f"holds the request {first.recording}, not {key}") as caught:
        ask(make(), prompt="another prompt")

    assert str(target) in str(caught.value)
    assert llm.count("another prompt") == 0


@pytest.mark.parametrize(("payload", "status", "message"), [
    ("overloaded", 500, "HTTP 500: overloaded"),
    ({"title": 3, "steps": []}, 200, "answer does not match Answer"),
])
def test_a_provider_error_records_nothing(
    make: Callable[..., RecordingClient], llm: ScriptedLLM, store: RecordingStore,
    payload: Any, status: int, message: str,
) -> None:
    llm.reply("split the parser", payload, status=status, times=1)
    llm.reply("split the parser", ANSWER)

    with pytest.raises(BackendError, match=message):
        ask(make())

    assert files(store) == []
    assert ask(make()).cached is False
    assert llm.count("split the parser") == 2


# --- concurrency --------------------------------------------------------------------------------


def test_concurrent_identical_calls_make_one_request_and_one_file(
    make: Callable[..., RecordingClient], llm: ScriptedLLM, store: RecordingStore
) -> None:
    llm.reply("split the parser", ANSWER, delay_seconds=0.3)
    client = make()
    start = threading.Barrier(8)

    def call(_: int) -> Any:
        start.wait(timeout=10)
        return ask(client)

    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(call, range(8)))

    assert llm.count("split the parser") == 1
    assert sorted(reply.cached for reply in replies) == [False] + [True] * 7
    assert {reply.recording for reply in replies} == {replies[0].recording}
    assert all(reply.parsed == Answer(**ANSWER) for reply in replies)
    [path] = files(store)
    assert store.get(replies[0].recording) is not None


def test_concurrent_writers_of_one_key_leave_one_whole_file(
    make: Callable[..., RecordingClient], llm: ScriptedLLM, store: RecordingStore
) -> None:
    # separate clients (as separate processes) share no lock: every one calls and writes
    llm.reply("split the parser", ANSWER, delay_seconds=0.2)
    clients = [make() for _ in range(6)]
    start = threading.Barrier(len(clients))

    def call(client: RecordingClient) -> Any:
        start.wait(timeout=10)
        return ask(client)

    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        replies = list(pool.map(call, clients))

    assert llm.count("split the parser") == len(clients)
    assert all(reply.cached is False for reply in replies)
    [path] = files(store)  # no temp file left behind
    recording = store.get(replies[0].recording)
    assert recording is not None and json.loads(recording.response.raw_text) == ANSWER
    assert ask(make()).cached is True


# --- the audit events ---------------------------------------------------------------------------

PLAN_DRAFT = {"strategies": [{"name": "direct", "description": "d", "steps": [
    {"id": "fix", "title": "Fix", "instruction": "fix a.py", "allowed_files": ["a.py"], "depends_on": [],
     "confidence": 0.9},
]}]}


def test_planner_event_carries_the_recording(
    make: Callable[..., RecordingClient], llm: ScriptedLLM, store: RecordingStore, tmp_path: Path
) -> None:
    llm.reply("Fix the greeting", PLAN_DRAFT)
    root = tmp_path / "repo"
    root.mkdir()
    (root / "a.py").write_text("print('helo')\n")
    calls: list[dict[str, Any]] = []

    for _ in range(2):
        plan = plan_with_llm(make(), goal="Fix the greeting", forks=1, root=root, constraints=[],
                             on_call=calls.append)
        assert plan.forks[0].steps[0].instruction == "fix a.py"

    assert llm.count("Fix the greeting") == 1
    [path] = files(store)
    assert [call["cached"] for call in calls] == [False, True]
    assert calls[0]["recording"] == calls[1]["recording"] == "sha256:" + path.stem
    assert calls[0]["input_tokens"] == calls[1]["input_tokens"] == 11


def test_llm_runner_event_carries_the_recording(
    make: Callable[..., RecordingClient], llm: ScriptedLLM, store: RecordingStore, tmp_path: Path
) -> None:
    llm.reply("greet properly", {"summary": "fixed", "explanation": "e",
                                 "edits": [{"path": "a.py", "action": "write", "content": "print('hello')\n"}]})
    task = Task(task_id="step_001", plan_id="p1", fork_id="1", attempt=1, instruction="greet properly",
                allowed_files=["a.py"], workspace="ws", timeout_seconds=5, max_diff_lines=100,
                policy_digest="sha256:" + "0" * 64, base_commit="0" * 40, confidence=Confidence(score=0.9, level="high"),
                created_at="2026-11-22T00:00:00Z")
    events: list[tuple[str, dict[str, Any]]] = []
    outcomes = []

    for attempt in ("a1", "a2"):  # the same base: a resumed attempt sends the identical prompt
        workspace = tmp_path / attempt
        workspace.mkdir()
        (workspace / "a.py").write_text("print('helo')\n")
        runner = LLMRunner(make(), on_event=lambda kind, data: events.append((kind, data)))
        outcomes.append(runner.run(task, workspace, lambda: False))
        assert (workspace / "a.py").read_text() == "print('hello')\n"

    assert llm.count("greet properly") == 1
    assert [outcome.status for outcome in outcomes] == ["completed", "completed"]
    [path] = files(store)
    assert [kind for kind, _ in events] == ["llm.call", "llm.call"]
    assert [data["cached"] for _, data in events] == [False, True]
    assert {data["recording"] for _, data in events} == {"sha256:" + path.stem}
