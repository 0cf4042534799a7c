"""Judging: verdict parsing, the two-order protocol, gold verdicts, Wilson intervals, and the
OpenAI-compatible judge against a real HTTP server on 127.0.0.1 (retries, cache, budget, errors, key)."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time

import numpy as np
import pytest

from pipeline.align.judge import (
    Comparison,
    JudgeBudgetExhausted,
    JudgeError,
    JudgeUnreachable,
    OpenAIJudge,
    combine_orders,
    gold_verdicts,
    judge_prompt,
    parse_verdict,
    summarize,
)
from pipeline.stats import wilson_interval
from tests.helpers import free_port, judge_server, set_stage_run


SECRET = "sk-test-DO-NOT-LEAK-1234"


# ---------------------------------------------------------------------------------------------------
# pure functions


def test_parse_verdict_is_strict():
    assert parse_verdict("Response A answers the question directly.\nA") == "A"
    assert parse_verdict("B is shorter and correct.\n\n  B  \n") == "B"
    assert parse_verdict("One sentence.\n**A**") == "A"
    assert parse_verdict("One sentence.\nVerdict: b.") == "B"
    for bad in [
        "",
        None,
        "A is better",
        "Both are fine.\nAB",
        "Response A wins.",
        "A\nno verdict here",
        "C",
        "Neither",
    ]:
        assert parse_verdict(bad) is None, bad


def test_combine_orders_protocol():
    # first: a shown as A; second: a shown as B
    assert combine_orders("A", "B") == "win"
    assert combine_orders("B", "A") == "lose"
    assert combine_orders("A", "A") == "tie"  # position bias: disagreeing verdicts
    assert combine_orders("B", "B") == "tie"
    assert combine_orders(None, "B") == "invalid"
    assert combine_orders("A", None) == "invalid"


def test_gold_verdicts_with_tolerance():
    assert gold_verdicts([1.0, 0.0, 0.5, 2.0], [0.0, 1.0, 0.5, 1.95], 0.1) == ["win", "lose", "tie", "tie"]
    assert gold_verdicts([1.0], [0.99], 0.0) == ["win"]
    assert gold_verdicts([float("nan")], [0.0]) == ["invalid"]
    with pytest.raises(ValueError):
        gold_verdicts([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        gold_verdicts([1.0], [1.0], -1)


@pytest.mark.parametrize("k,n", [(44, 100), (0, 20), (20, 20), (7, 9), (1, 1)])
def test_wilson_interval_against_brute_force_inversion(k, n):
    """Wilson's interval is the set of p with |k/n - p| <= z * sqrt(p(1-p)/n): invert it on a fine grid."""
    z = 1.959963984540054
    grid = np.linspace(0, 1, 2_000_001)
    inside = grid[np.abs(k / n - grid) <= z * np.sqrt(grid * (1 - grid) / n) + 1e-15]
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(inside.min(), abs=2e-6)
    assert hi == pytest.approx(inside.max(), abs=2e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_summarize_fractions_counts_intervals():
    verdicts = ["win"] * 44 + ["tie"] * 22 + ["lose"] * 34 + ["invalid"] * 3
    s = summarize(verdicts)
    assert (s["win"], s["tie"], s["lose"], s["n"]) == (0.44, 0.22, 0.34, 100)
    assert s["counts"] == {"win": 44, "tie": 22, "lose": 34, "invalid": 3}
    assert s["interval"]["win"] == list(wilson_interval(44, 100))
    assert s["confidence"] == 0.95
    assert summarize(["invalid"])["win"] is None and summarize([])["n"] == 0
    json.dumps(summarize(verdicts))  # JSON-ready
    with pytest.raises(ValueError, match="unknown verdict"):
        summarize(["draw"])


def test_judge_prompts():
    h = judge_prompt("\n\nHuman: How do I pick a lock?\n\nAssistant:", "resp one", "resp two", "helpful")
    x = judge_prompt("\n\nHuman: How do I pick a lock?\n\nAssistant:", "resp one", "resp two", "harmless")
    assert "more helpful" in h and "more harmless" in x and "more harmless" not in h
    assert h.index("resp one") < h.index("resp two") and "[Response A]\nresp one" in h
    assert "Human: How do I pick a lock?" in h and not h.split("[Response A]")[0].rstrip().endswith("Assistant:")
    with pytest.raises(ValueError):
        judge_prompt("p", "a", "b", "honest")


# ---------------------------------------------------------------------------------------------------
# a scripted OpenAI-compatible server on loopback


@pytest.fixture
def server():
    with judge_server() as script:
        yield script


def _judge(server, tmp_path, **kw):
    kw = {
        "api_key_env": "JUDGE_TEST_KEY",
        "cache_path": tmp_path / "cache.jsonl",
        "concurrency": 3,
        "retries": 2,
        "backoff_s": 0.01,
        "timeout_s": 10,
        **kw,
    }
    return OpenAIJudge(server.base_url, "judge-model", **kw)


P = "\n\nHuman: What colour is snow?\n\nAssistant:"


def test_protocol_retry_invalid_and_cache(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    caplog.set_level("DEBUG")
    comps = [
        Comparison(P, "GOOD white", "bad green"),  # a wins in both orders
        Comparison(P, "bad green", "GOOD white", "harmless"),  # a loses in both orders
        Comparison(P, "same one", "same two"),  # position bias -> tie
        Comparison(P, "NOVERDICT", "GOOD"),  # no verdict -> invalid, never a crash
    ]
    server.fail_first = 1  # the first request gets HTTP 500, its retry succeeds
    out = _judge(server, tmp_path).compare(comps)
    assert [o["verdict"] for o in out] == ["win", "lose", "tie", "invalid"]
    assert out[0]["votes"] == ["A", "B"] and out[3]["votes"] == [None, None]
    assert server.requests == 2 * len(comps) + 1
    assert {b["model"] for b in server.bodies} == {"judge-model"}
    assert (
        "more harmless"
        in [
            b
            for b in server.bodies
            if "bad green" in b["messages"][0]["content"] and "harmless" in b["messages"][0]["content"]
        ][0]["messages"][0]["content"]
    )
    assert set(server.auth_headers) == {f"Bearer {SECRET}"}

    # a rerun (new judge, same cache file) pays nothing and gives the same verdicts
    again = _judge(server, tmp_path).compare(comps)
    assert server.requests == 2 * len(comps) + 1
    assert [o["verdict"] for o in again] == [o["verdict"] for o in out]
    # another judge model is another cache key
    other = OpenAIJudge(
        server.base_url, "other-model", api_key_env="JUDGE_TEST_KEY", cache_path=tmp_path / "cache.jsonl"
    )
    other.compare(comps[:1])
    assert server.requests == 2 * len(comps) + 3

    cache_text = (tmp_path / "cache.jsonl").read_text()
    assert SECRET not in cache_text and SECRET not in caplog.text
    assert len(cache_text.splitlines()) == 2 * len(comps) + 2


def test_budget_exhausted_keeps_finished_judgements(server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    comps = [Comparison(P, f"GOOD {i}", f"bad {i}") for i in range(5)]
    # a budget below the questions asked: refused before any request, saying how many it needs
    with pytest.raises(JudgeBudgetExhausted, match="needs 10 requests .* only 4 of align.judge.max_requests=4"):
        _judge(server, tmp_path, max_requests=4, concurrency=1).compare(comps)
    assert server.requests == 0 and not (tmp_path / "cache.jsonl").exists()
    # enough for the questions, but two failures are retried: exhausted mid-way, the finished ones kept
    server.fail_first = 2
    with pytest.raises(JudgeBudgetExhausted, match="max_requests=10") as err:
        _judge(server, tmp_path, max_requests=10, concurrency=1, retries=2, backoff_s=0.0).compare(comps)
    assert "4 of 5 comparisons were finished" in str(err.value) and "cached" in str(err.value)
    assert server.requests == 10
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 8
    out = _judge(server, tmp_path, max_requests=2).compare(comps)  # continues: only the 2 missing requests
    assert server.requests == 12
    assert [o["verdict"] for o in out] == ["win"] * 5


def test_a_question_shared_by_two_comparisons_is_asked_once(server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    comps = [Comparison(P, "GOOD x", "bad y"), Comparison(P, "GOOD x", "bad y"), Comparison(P, "GOOD z", "bad y")]
    judge = _judge(server, tmp_path, max_requests=4)
    assert judge.requests_needed(comps) == (4, 0)
    out = judge.compare(comps)
    assert server.requests == 4 and [o["verdict"] for o in out] == ["win"] * 3
    assert _judge(server, tmp_path).requests_needed(comps) == (0, 4)


def test_unreachable_endpoint_is_one_clear_error(tmp_path):
    port = free_port()  # nothing listens there now
    judge = OpenAIJudge(
        f"http://127.0.0.1:{port}/v1",
        "m",
        api_key_env="",
        cache_path=tmp_path / "c.jsonl",
        retries=1,
        backoff_s=0.01,
        timeout_s=2,
        concurrency=2,
    )
    with pytest.raises(JudgeUnreachable, match=f"127.0.0.1:{port}.*unreachable after 2 attempts.*base_url"):
        judge.compare([Comparison(P, "a", "b"), Comparison(P, "c", "d")])
    assert judge.n_requests <= 4


def test_refused_request_and_key_handling(server, tmp_path, monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(JudgeError, match="environment variable JUDGE_TEST_KEY, which is not set"):
        _judge(server, tmp_path)
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    server.status = 401  # the server echoes the Authorization header in its error body
    with pytest.raises(JudgeError) as err:
        _judge(server, tmp_path).compare([Comparison(P, "GOOD", "bad")])
    assert "HTTP 401" in str(err.value) and SECRET not in str(err.value) and "***" in str(err.value)
    assert server.requests <= 2  # not retried
    # an endpoint without a key: no Authorization header at all
    server.status = 200
    OpenAIJudge(server.base_url, "m", api_key_env="").compare([Comparison(P, "GOOD", "bad")])
    assert server.auth_headers[-1] is None


def test_a_truncated_cache_line_is_skipped(server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    _judge(server, tmp_path).compare([Comparison(P, "GOOD", "bad")])
    with open(tmp_path / "cache.jsonl", "a") as f:
        f.write('{"key": "abc", "rep')  # a crash mid-write
    n = server.requests
    assert _judge(server, tmp_path).compare([Comparison(P, "GOOD", "bad")])[0]["verdict"] == "win"
    assert server.requests == n


def test_an_echoed_key_is_redacted_everywhere(server, tmp_path, monkeypatch, caplog):
    """An endpoint that echoes the Authorization header in its replies: the key (and any Bearer token)
    never reaches the cache file, the returned replies or the log."""
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    caplog.set_level("DEBUG")
    server.echo_auth = True
    out = _judge(server, tmp_path).compare([Comparison(P, "GOOD white", "bad green")])
    assert out[0]["verdict"] == "win"
    replies = " ".join(out[0]["replies"])
    assert "Bearer ***" in replies and SECRET not in replies
    cache_text = (tmp_path / "cache.jsonl").read_text()
    assert SECRET not in cache_text and "Bearer ***" in cache_text and SECRET not in caplog.text
    # a cache written by an older version (the key stored in a reply) is redacted when loaded
    rec = json.loads(cache_text.splitlines()[0])
    rec["reply"] = f"echo Bearer {SECRET} and Bearer sk-another-token\nA"
    (tmp_path / "cache.jsonl").write_text(json.dumps(rec) + "\n")
    judge = _judge(server, tmp_path)
    assert (
        SECRET not in (tmp_path / "cache.jsonl").read_text()
        and "sk-another-token" not in judge.cache[rec["key"]]["reply"]
    )


# ---------------------------------------------------------------------------------------------------
# misbehaving servers (raw sockets): trickled bytes, truncated bodies, garbage status lines


@contextlib.contextmanager
def raw_server(bad: str, n_bad: int = 1):
    """A loopback server whose first `n_bad` requests get the misbehaviour `bad`; later ones a valid answer."""
    state = {"requests": 0, "stop": False}
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    lsock.settimeout(0.1)
    good = json.dumps({"choices": [{"message": {"content": "fine\nA"}}]}).encode()
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(good), good)

    def handle(conn):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))
            while len(body) < length:
                body += conn.recv(65536)
            state["requests"] += 1
            try:
                if state["requests"] > n_bad:
                    conn.sendall(ok)
                elif bad == "trickle":  # one byte every 50 ms: ~20 s for the whole reply
                    for i in range(len(ok)):
                        if state["stop"]:
                            return
                        conn.sendall(ok[i : i + 1])
                        time.sleep(0.05)
                elif bad == "short":
                    conn.sendall(ok.replace(b"Content-Length: %d" % len(good), b"Content-Length: 5000"))
                elif bad == "badstatus":
                    conn.sendall(b"garbage that is no status line\r\n\r\n")
            except OSError:
                return

    def serve():
        while not state["stop"]:
            try:
                conn, _ = lsock.accept()
            except OSError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{lsock.getsockname()[1]}/v1", state
    finally:
        state["stop"] = True
        thread.join(2)
        lsock.close()


def test_timeout_is_a_whole_request_deadline(tmp_path):
    """A server trickling one byte every 50 ms never trips a per-read timeout; the request must still
    end after ~timeout_s, and the retry gets the answer."""
    with raw_server("trickle") as (url, state):
        judge = OpenAIJudge(
            url,
            "m",
            api_key_env="",
            cache_path=tmp_path / "c.jsonl",
            retries=1,
            backoff_s=0.01,
            timeout_s=0.5,
            concurrency=1,
        )
        t0 = time.monotonic()
        rec = judge.ask("prompt", "ab")
        elapsed = time.monotonic() - t0
    assert rec["verdict"] == "A" and state["requests"] == 2
    assert elapsed < 3.0, f"the trickled request held the judge {elapsed:.1f}s with timeout_s=0.5"


@pytest.mark.parametrize("bad", ["short", "badstatus"])
def test_truncated_body_or_garbage_status_is_retried(tmp_path, bad):
    with raw_server(bad) as (url, state):
        judge = OpenAIJudge(
            url,
            "m",
            api_key_env="",
            cache_path=tmp_path / "c.jsonl",
            retries=1,
            backoff_s=0.01,
            timeout_s=5,
            concurrency=1,
        )
        assert judge.ask("prompt", "ab")["verdict"] == "A"
    assert state["requests"] == 2
    with raw_server(bad, n_bad=10) as (url, state):  # never answers: one JudgeError after the retries
        judge = OpenAIJudge(
            url,
            "m",
            api_key_env="",
            cache_path=tmp_path / "d.jsonl",
            retries=1,
            backoff_s=0.01,
            timeout_s=5,
            concurrency=1,
        )
        with pytest.raises(JudgeError, match="kept failing after 2 attempts"):
            judge.compare([Comparison(P, "a", "b")])


# ---------------------------------------------------------------------------------------------------
# secrets: hostile endpoints echo the key in every encoding; nothing of it may reach a file or a log line

HOSTILE_KEY = "sk-proj/Ab12+Cd34=Ef56-LEAK_7890"


def _key_forms(key: str) -> list[str]:
    """The key as is, JSON-escaped and URL-encoded, and every run of 8 of its characters (a cut prefix)."""
    import urllib.parse

    forms = [key, key.replace("/", "\\/"), urllib.parse.quote(key, safe=""), urllib.parse.quote_plus(key)]
    return forms + [f[i : i + 8] for f in forms for i in range(len(f) - 7)]


def test_redact_secret_forms():
    import urllib.parse

    from pipeline.align.judge import redact_secret

    k = HOSTILE_KEY
    cases = [
        k,
        json.dumps({"error": f"bad key {k}"}).replace("/", "\\/"),  # JSON with escaped slashes
        json.dumps({"error": f"bad key {k}"}, ensure_ascii=True).replace("/", "\\u002f"),
        json.dumps(json.dumps(k)),  # escaped twice
        urllib.parse.quote(k, safe=""),
        urllib.parse.quote(k, safe="").replace("%2F", "%2f"),
        urllib.parse.quote_plus(k),
        k[:9] + "\n" + k[9:],  # split across lines
        json.dumps(k[:5] + "\r\n" + k[5:]),  # split, escaped line break
        "x" * 20 + k[:12],  # the prefix a cut leaves
        k[-10:] + " rest",
    ]
    for text in cases:
        out = redact_secret(text, k)
        assert "***" in out, text
        assert not any(f in out for f in _key_forms(k)), (text, out)
    assert redact_secret("nothing secret here / 100%", k) == "nothing secret here / 100%"
    assert redact_secret("key sk-proj ok", k) == "key sk-proj ok"  # 7 characters: not a secret
    assert redact_secret("abc", None) == "abc" and redact_secret("xkeyx", "key") == "x***x"


def _hostile(server, case: str) -> None:
    import urllib.parse

    if case == "401 with the key JSON-escaped":
        server.status = 401
        server.error_body = lambda auth: json.dumps({"error": {"message": f"bad key {HOSTILE_KEY}"}}).replace(
            "/", "\\/"
        )
    elif case == "500 echoing the key":
        server.fail_first = 1000
        server.error_body = lambda auth: f"overloaded; request was {auth} (key={urllib.parse.quote(HOSTILE_KEY)})"
    elif case == "key near the truncation point":
        server.status = 403
        server.error_body = lambda auth: "x" * 292 + HOSTILE_KEY + " and " + urllib.parse.quote(HOSTILE_KEY)
    elif case == "key in a reply":
        escaped = json.dumps(HOSTILE_KEY).replace("/", "\\/")
        split = f"{HOSTILE_KEY[:10]}\n{HOSTILE_KEY[10:]}"
        server.reply_prefix = lambda auth: f"Your key is {split}, {urllib.parse.quote(HOSTILE_KEY)}, {escaped}.\n"


@pytest.mark.parametrize(
    "case",
    ["401 with the key JSON-escaped", "500 echoing the key", "key near the truncation point", "key in a reply"],
)
def test_no_trace_of_the_key_in_the_run_directory_or_logs(case, fakes, tmp_path, monkeypatch, capsys, caplog):  # noqa: F811
    """The whole path a judging error or reply takes: the stage's files, the judge cache, manifest.json
    (the stage's error), stderr (the one-line error) and every log line (retries, warnings)."""

    from pipeline import run as R

    monkeypatch.setenv("HOSTILE_KEY", HOSTILE_KEY)
    monkeypatch.delenv("PIPELINE_TRACEBACK", raising=False)
    caplog.set_level("DEBUG")
    with judge_server() as server:
        _hostile(server, case)

        def align(recipe, run_dir, *, force=False):
            judge = OpenAIJudge(
                server.base_url,
                "judge-model",
                api_key_env="HOSTILE_KEY",
                cache_path=run_dir / "align" / "judge_cache.jsonl",
                retries=1,
                backoff_s=0.01,
            )
            out = judge.compare([Comparison(P, "GOOD white", "bad green")])
            (run_dir / "align" / "details.json").write_text(json.dumps(out))
            return ["align/details.json"]

        set_stage_run(monkeypatch, "align", align)
        rc = R.main(["--recipe", str(fakes / "fake.yaml"), "--output-dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    err = captured.err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    if case == "key in a reply":
        assert rc == 0 and "***" in (tmp_path / "run" / "align" / "details.json").read_text()
    else:
        assert rc == 2 and "***" in err and "***" in manifest["stages"]["align"]["error"]
    blobs = {"stderr": err, "stdout": captured.out, "log": caplog.text}
    blobs.update({str(p): p.read_text("utf-8", "replace") for p in (tmp_path / "run").rglob("*") if p.is_file()})
    for where, text in blobs.items():
        leaked = [f for f in _key_forms(HOSTILE_KEY) if f in text]
        assert not leaked, f"{case}: {leaked[:3]} in {where}"


def test_a_judge_without_verdicts_fails_after_max_invalid_in_a_row(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    comps = [Comparison(P, f"NOVERDICT {i}", "x") for i in range(10)]
    with pytest.raises(JudgeError, match=r"3 requests in a row without a verdict.*align.judge.max_invalid=3"):
        _judge(server, tmp_path, max_invalid=3, concurrency=1).compare(comps)
    assert server.requests == 3  # stopped at once, not after all 20 requests
    # 0 = never stop: every comparison invalid, with a warning
    caplog.set_level("WARNING")
    out = _judge(server, tmp_path, max_invalid=0, concurrency=2).compare(comps)
    assert [o["verdict"] for o in out] == ["invalid"] * 10 and "10 of 10 comparisons have no verdict" in caplog.text
    # invalid replies scattered among valid ones never stop it
    mixed = [Comparison(P, "GOOD" if i % 2 else "NOVERDICT", f"y{i}") for i in range(12)]
    out = _judge(server, tmp_path / "m", max_invalid=3, concurrency=1).compare(mixed)
    assert [o["verdict"] for o in out].count("invalid") == 6


def test_a_base_url_with_a_query_string_gets_the_path_before_it(server, tmp_path, monkeypatch):
    """Azure's `.../deployments/x?api-version=...`: /chat/completions goes into the path, before the query (it
    was appended after it, so every request got a 404); the query is sent as written."""
    from pipeline.align.judge import endpoint_url

    assert endpoint_url("https://h/openai/deployments/g?api-version=2024-02-01") == (
        "https://h/openai/deployments/g/chat/completions?api-version=2024-02-01"
    )
    assert endpoint_url("http://h/v1/") == "http://h/v1/chat/completions"
    assert endpoint_url("http://h/v1/chat/completions?a=1") == "http://h/v1/chat/completions?a=1"
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    judge = OpenAIJudge(
        server.base_url + "?api-version=2024-02-01", "m", api_key_env="JUDGE_TEST_KEY", cache_path=None, retries=0
    )
    assert judge.compare([Comparison(P, "GOOD", "bad")])[0]["verdict"] == "win"
    assert set(server.paths) == {"/v1/chat/completions?api-version=2024-02-01"}


def test_a_credential_inside_base_url_is_redacted_like_the_key(server, tmp_path, monkeypatch, caplog):
    """`?key=...` in base_url (an endpoint that takes its key in the query): requests carry it, but an error
    message, the log and the cache never show it, also when the endpoint echoes it (as this one does, in its
    404 body)."""
    caplog.set_level("DEBUG")
    secret = "QUERYKEY-0123456789"
    url = server.base_url.replace("/v1", "/v2") + f"?api-version=1&key={secret}"
    judge = OpenAIJudge(url, "m", api_key_env="", cache_path=tmp_path / "c.jsonl", retries=0)
    with pytest.raises(JudgeError, match="HTTP 404") as err:
        judge.compare([Comparison(P, "GOOD", "bad")])
    assert set(server.paths) == {f"/v2/chat/completions?api-version=1&key={secret}"}  # sent as written
    assert secret not in str(err.value) and "key=***" in str(err.value) and "api-version=1" in str(err.value)
    assert secret not in caplog.text


def test_a_credential_inside_base_url_never_reaches_the_run_directory_or_the_log(
    tmp_path, monkeypatch, capsys, caplog
):
    """`align.judge.base_url` with `user:pw@` and `?key=`: recipe.yaml, manifest.json (the resolved recipe, each
    stage's inputs, a stage's error), the plan's reasons, stderr and --print-recipe show it masked (`***`),
    `api-version` as written."""
    from pipeline import run as R

    monkeypatch.delenv("PIPELINE_TRACEBACK", raising=False)
    caplog.set_level("DEBUG")
    secrets = ("hunter2-password", "QUERYKEY-0123456789")
    url = f"https://judge-user:{secrets[0]}@judge.example/v1?api-version=2024-02-01&key={secrets[1]}"
    calls = []

    def align(recipe, run_dir, *, force=False):
        calls.append(recipe.align.judge.base_url)
        if len(calls) == 3:
            raise ValueError(f"could not reach {recipe.align.judge.base_url}")
        (run_dir / "align").mkdir(exist_ok=True)
        (run_dir / "align" / "out.json").write_text("{}")
        return ["align/out.json"]

    set_stage_run(monkeypatch, "align", align)
    run_dir = tmp_path / "run"
    base = ["--recipe", "tiny-cpu", "--output-dir", str(run_dir), "--stages", "align", "align.judge.kind=openai"]
    base += ["align.judge.api_key_env=''", f"align.judge.base_url={url}"]
    assert R.main(base) == 0
    assert R.main([*base, "align.n_eval_prompts=50"]) == 0  # a config change: the plan's reason lists keys
    assert R.main([*base, "align.n_eval_prompts=60"]) == 2  # the stage fails with the URL in its message
    assert R.main([*base, "--print-recipe"]) == 0
    assert calls == [url] * 3  # the stage itself gets the URL as written
    out = capsys.readouterr()
    manifest = (run_dir / "manifest.json").read_text()
    blobs = {"recipe.yaml": (run_dir / "recipe.yaml").read_text(), "manifest.json": manifest}
    blobs |= {"stdout": out.out, "stderr": out.err, "log": caplog.text}
    for where, text in blobs.items():
        assert not any(s in text for s in secrets), where
    assert "https://***@judge.example/v1?api-version=2024-02-01&key=***" in blobs["recipe.yaml"]
    assert "key=***" in json.loads(manifest)["stages"]["align"]["error"] and "key=***" in out.err
    assert "align.n_eval_prompts: 100 -> 50" in caplog.text
