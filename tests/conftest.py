"""Shared test fixtures (generic: usable by every package's tests). Plain helpers and constants live in
helpers.py (and reward_helpers.py); a test module imports those, never another test module."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings


# Property tests (hypothesis): the suite draws the same examples on every run (derandomized, no example
# database), so CI is reproducible; HYPOTHESIS_PROFILE=explore draws fresh random examples on each run.
settings.register_profile("default", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# assertions inside the shared helpers (a launcher's exit code) report like a test's own
pytest.register_assert_rewrite("tests.helpers", "tests.reward_helpers")

from tests.helpers import CHATML, LLAMA3, write_fakes  # noqa: E402


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


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """Fake sections/stages installed in-process; yields the dir holding fake.yaml and runner.py."""
    import pipeline.stages as stages

    d = write_fakes(tmp_path / "fakes")
    monkeypatch.syspath_prepend(str(d))
    sys.modules.pop("fakepipe", None)
    import fakepipe

    monkeypatch.setattr(stages, "DATA_SECTION", ("data", fakepipe.Data))
    monkeypatch.setattr(stages, "STAGES", fakepipe.fake_stages(stages))
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.log"))
    yield d
    sys.modules.pop("fakepipe", None)
