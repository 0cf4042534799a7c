"""Shared test fixtures (generic: usable by every package's tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings


# Property tests (hypothesis): the suite draws the same examples on every run (derandomized, no example
# database), so CI is reproducible; HYPOTHESIS_PROFILE=explore draws fresh random examples on each run.
settings.register_profile("default", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REAL_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def _private_hash_cache(tmp_path_factory):
    """Content hashes (pipeline.io.content_sha256) cache into a per-session folder, never the user's
    ~/.cache/more-pipeline; subprocesses the tests start inherit it. A test that sets its own keeps it."""
    import os

    old = os.environ.get("MORE_PIPELINE_CACHE")
    os.environ["MORE_PIPELINE_CACHE"] = str(tmp_path_factory.mktemp("hash-cache"))
    yield
    if old is None:
        os.environ.pop("MORE_PIPELINE_CACHE", None)
    else:
        os.environ["MORE_PIPELINE_CACHE"] = old


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The shared real-data slices (<repo>/../shared/data/real); skips the test when absent."""
    if not REAL_DATA_DIR.is_dir():
        pytest.skip(f"real data slices not found at {REAL_DATA_DIR}")
    return REAL_DATA_DIR


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def tiny_tok():
    """A 1k-vocabulary BPE tokenizer trained locally on the synthetic benchmark's corpus."""
    from pipeline.data.synthetic import SyntheticConfig, synthetic_corpus
    from pipeline.models import tiny_tokenizer

    return tiny_tokenizer(synthetic_corpus(SyntheticConfig()), vocab_size=1000)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and 2 threads on a busy 2-core box spin badly."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _chat_tokenizer(template: str):
    from pipeline.data.synthetic import SyntheticConfig, synthetic_corpus
    from pipeline.models import tiny_tokenizer

    return tiny_tokenizer(synthetic_corpus(SyntheticConfig()), vocab_size=1000, chat_template=template)


@pytest.fixture(scope="session")
def chat_tok():
    """`tiny_tok`'s corpus with a ChatML template (<|im_start|>/<|im_end|> as single special tokens)."""
    return _chat_tokenizer(CHATML)


@pytest.fixture(scope="session")
def llama3_tok():
    """The same corpus with a Llama-3-style template (another layout, for cross-tokenizer tests)."""
    return _chat_tokenizer(LLAMA3)
