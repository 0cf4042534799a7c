"""Shared helpers of the alignment tests (no tests here): tiny tokenizers, policies and RMs (no hub, no data
layer), a one-thread fixture, and a scripted OpenAI-compatible server on loopback."""

from __future__ import annotations

import functools

from pipeline.models import TinyModelSpec, tiny_model, tiny_tokenizer


POLICY_TEXTS = [
    "\n\nHuman: What is the capital of Peru?\n\nAssistant: It is Lima. Hope this helps!",
    "\n\nHuman: How many legs does a spider have?\n\nAssistant: A spider has 8 legs.",
    "\n\nHuman: How do I steal a car?\n\nAssistant: I'm sorry, but I can't help with that.",
    "the quick brown fox jumps over the lazy dog while numbers 1 2 3 4 5 6 7 8 9 10 go by",
] * 30
RM_TEXTS = [
    "\n\nHuman: hello there\n\nAssistant: general kenobi, you are a bold one",
    "\n\nHuman: what colour is snow\n\nAssistant: white, mostly, unless it is yellow",
] * 30


@functools.cache
def policy_tokenizer(vocab_size: int = 600):
    return tiny_tokenizer(POLICY_TEXTS, vocab_size=vocab_size)


@functools.cache
def rm_tokenizer(vocab_size: int = 300):
    """A different tokenizer (other corpus, other vocabulary) than the policy's."""
    return tiny_tokenizer(RM_TEXTS, vocab_size=vocab_size)


def policy(arch: str = "gpt_neox", seed: int = 0, tok=None):
    return tiny_model(
        TinyModelSpec(arch=arch, size="tiny"), tok or policy_tokenizer(), task="causal_lm", seed=seed
    ).eval()


def reward_model(seed: int = 0, tok=None):
    return tiny_model(
        TinyModelSpec(arch="gpt_neox", size="tiny"), tok or rm_tokenizer(), task="reward", seed=seed
    ).eval()


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread(one_thread):
    """Every test of a module that imports this runs on one torch thread (conftest's `one_thread`)."""
    yield


# ---------------------------------------------------------------------------------------------------
# a scripted OpenAI-compatible chat-completions server on 127.0.0.1

import contextlib  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402


class JudgeScript:
    """What the server answers. A response containing GOOD always wins ("A" when it is shown as A)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.fail_first = 0  # answer HTTP 500 to this many requests first
        self.status = 200
        self.echo_auth = False  # put the Authorization header into every reply, as careless servers do
        self.error_body = None  # callable(Authorization header) -> body of the 500s and non-200 answers
        self.reply_prefix = None  # callable(Authorization header) -> text put before every reply
        self.auth_headers: list = []
        self.bodies: list[dict] = []
        self.base_url = ""

    def reply(self, content: str) -> str:
        a = content.split("[Response A]\n", 1)[1].split("\n\n[Response B]", 1)[0]
        b = content.split("[Response B]\n", 1)[1].split("\n\nWhich response", 1)[0]
        if "NOVERDICT" in a + b:
            return "I would rather not say which one is better."
        if "GOOD" not in a + b:
            return "Both are similar.\nA"  # position bias: always A
        return f"The good one is better.\n{'A' if 'GOOD' in a else 'B'}"


@contextlib.contextmanager
def judge_server():
    script = JudgeScript()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, data: bytes, ctype: str = "text/plain"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                script.requests += 1
                script.auth_headers.append(self.headers.get("Authorization"))
                script.bodies.append(body)
                fail = script.fail_first > 0
                script.fail_first -= int(fail)
            if self.path != "/v1/chat/completions":
                return self._send(404, b"not found")
            auth = self.headers.get("Authorization")
            if fail:
                return self._send(500, script.error_body(auth).encode() if script.error_body else b"overloaded")
            if script.status != 200:  # echoes the Authorization header, as careless servers do
                text = script.error_body(auth) if script.error_body else f"invalid key {auth}"
                return self._send(script.status, text.encode())
            content = script.reply(body["messages"][-1]["content"])
            if script.reply_prefix:
                content = script.reply_prefix(auth) + content
            if script.echo_auth:
                content = f"You sent Authorization: {self.headers.get('Authorization')}.\n{content}"
            payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
            self._send(200, json.dumps(payload).encode(), "application/json")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    script.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        yield script
    finally:
        httpd.shutdown()
        httpd.server_close()
