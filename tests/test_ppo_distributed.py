"""PPO under 2 real CPU processes (torchrun, gloo): DDP, and DeepSpeed ZeRO-2 and ZeRO-3.

The test functions launch THIS file as the worker script:
    torchrun --nproc_per_node 2 --standalone tests/test_ppo_distributed.py OUT_DIR [--zero 2|3]
Each rank records a fingerprint of its policy weights and of the responses it sampled.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _check_two_ranks(out: Path, r0: dict, r1: dict):
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["samples"] != r1["samples"]  # each rank rolled out its own prompts ...
    assert r0["weights"] == r1["weights"]  # ... and both ended with exactly the same policy
    assert r0["weights"] != r0["initial_weights"]  # which PPO did change
    log = [json.loads(line) for line in (out / "ppo_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    assert all(k in log[0] for k in ("policy_loss", "value_loss", "kl_mean", "gold_mean", "clipfrac", "entropy"))
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out / "policy")
    assert _fingerprint(saved) == r0["weights"]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_two_ranks_end_with_identical_policies(tmp_path):
    from tests.helpers import torchrun_worker  # imported here: the worker below runs without tests/ on its path

    r0, r1 = torchrun_worker(Path(__file__).resolve(), tmp_path, timeout=300)
    _check_two_ranks(tmp_path, r0, r1)


@pytest.mark.distributed
@pytest.mark.deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_ranks(tmp_path, stage):
    """ZeRO-2, and ZeRO-3 (sharded parameters: gathered for generation, gathered for the reference copy
    and for the final save)."""
    from tests.helpers import torchrun_worker

    r0, r1 = torchrun_worker(Path(__file__).resolve(), tmp_path, "--zero", str(stage), timeout=500)
    assert r0["deepspeed"] and r1["deepspeed"]
    _check_two_ranks(tmp_path, r0, r1)


# ------------------------------------------------------------------------------------------------
# worker


def _fingerprint(model, zero3: bool = False) -> list[float]:
    import contextlib

    import torch

    gather = contextlib.nullcontext()
    if zero3:  # ZeRO-3 keeps only a shard of every parameter on each rank
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
    with torch.no_grad(), gather:
        return [round(float(p.detach().double().sum()), 10) for _, p in sorted(model.state_dict().items())]


def _worker(out: Path, zero: int, lora: bool = False):
    import torch

    torch.set_num_threads(1)
    from accelerate import Accelerator

    if zero:
        # DeepSpeed on CPU: its communication layer must wrap a gloo process group (its CPU default, ccl,
        # is not installed) before accelerate builds the DeepSpeed engine; and accelerate must be told the
        # backend, since with cpu=True it ignores DeepSpeed and without it finds no backend on CPU.
        import deepspeed
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        deepspeed.init_distributed(dist_backend="gloo")
        plugin = DeepSpeedPlugin(
            hf_ds_config={
                "zero_optimization": {"stage": zero},
                "train_micro_batch_size_per_gpu": "auto",
                "train_batch_size": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
                "bf16": {"enabled": False},
                "fp16": {"enabled": False},
            }
        )
        accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    else:
        accelerator = Accelerator(cpu=True)  # on CPU, accelerate only goes MULTI_CPU (gloo) with cpu=True

    from pipeline.align.ppo import PPOConfig, train_ppo
    from pipeline.data.synthetic import SyntheticConfig, gold_reward, synthetic_corpus, synthetic_prompts
    from pipeline.models import TinyModelSpec, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(synthetic_corpus(SyntheticConfig(), n_dialogues=200), vocab_size=500)
    policy = tiny_model(TinyModelSpec(arch="gpt_neox"), tok, task="causal_lm", seed=0)
    initial = _fingerprint(policy, zero == 3)
    samples = []

    def reward_fn(prompts, responses):
        samples.extend(responses)
        return [gold_reward(p, r) for p, r in zip(prompts, responses)]

    cfg = PPOConfig(
        num_steps=2,
        rollout_batch_size=4,
        mini_batch_size=2,
        ppo_epochs=2,
        learning_rate=1e-3,
        max_new_tokens=8,
        max_prompt_length=48,
        progress=False,
        use_peft=lora,
        lora_r=4,
    )
    prompts = synthetic_prompts(16, seed=0, split="train")
    gold_fn = lambda ps, rs: [gold_reward(p, r) for p, r in zip(ps, rs)]  # noqa: E731
    train_ppo(policy, tok, prompts, reward_fn, cfg, out, accelerator=accelerator, gold_fn=gold_fn)
    result = {
        "world_size": accelerator.num_processes,
        "deepspeed": accelerator.state.deepspeed_plugin is not None,
        "initial_weights": initial,
        "weights": _fingerprint(policy, zero == 3),
        "samples": samples,
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(
        Path(sys.argv[1]),
        int(sys.argv[sys.argv.index("--zero") + 1]) if "--zero" in sys.argv else 0,
        "--lora" in sys.argv,
    )
    from pipeline.dist import shutdown_distributed

    shutdown_distributed()  # deterministic teardown: no rank may abort at interpreter exit
