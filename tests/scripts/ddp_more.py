"""Run MORE on 2 CPU processes (torchrun, gloo) and record each rank's lambdas and final weights.

usage: torchrun --nproc_per_node 2 tests/scripts/ddp_more.py OUT_DIR [--zero 2|3]
"""

import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.dist import shutdown_distributed  # noqa: E402
from pipeline.reward.trainer import MORERewardTrainer  # noqa: E402
from tests import reward_helpers as H  # noqa: E402


class RecordLambda(TrainerCallback):
    def __init__(self):
        self.trainer, self.lams = None, []

    def on_step_end(self, args, state, control, **kw):
        self.lams.append(self.trainer._last_lambda.tolist())


def full_weights(model, zero: int) -> dict:
    """Every parameter, whole on this rank (ZeRO-3 partitions them: gather for reading)."""
    params = dict(model.named_parameters())
    if zero == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {n: p.detach().clone().float() for n, p in params.items()}
    return {n: p.detach().clone().float() for n, p in params.items()}


def main():
    out = Path(sys.argv[1])
    zero = int(sys.argv[sys.argv.index("--zero") + 1]) if "--zero" in sys.argv else 0
    extra = {}
    if zero:
        # DeepSpeed on CPU: its communication layer must wrap the gloo process group before the Trainer
        # builds the DeepSpeed config, or it counts a world of 1 (batch-size assertion).
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        extra["deepspeed"] = {
            "zero_optimization": {"stage": zero},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": False},
            "fp16": {"enabled": False},
        }
    tok = H.tokenizer()
    model = H.model("gpt_neox", tok)  # before the DeepSpeed config exists: the same init as without ZeRO-3
    args = H.config(out / "ckpt", "more", max_steps=4, use_cpu=True, **extra)
    rec = RecordLambda()
    trainer = MORERewardTrainer(model, args, train_dataset=H.balanced_pairs(8), processing_class=tok, callbacks=[rec])
    rec.trainer = trainer
    seen = []  # fingerprints of this rank's batches: ranks must see different data
    collate = trainer.data_collator
    trainer.data_collator = lambda ex: (lambda b: (seen.append(int(b["input_ids"].sum())), b)[1])(collate(ex))
    trainer.train()
    rank = trainer.args.process_index
    result = {"lambdas": rec.lams, "world_size": trainer.args.world_size, "batches": seen}
    weights = full_weights(trainer.model, zero)
    result["weight_sum"] = float(sum(w.double().sum() for w in weights.values()))
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.save(weights, out / f"rank{rank}_weights.pt")
    del trainer, rec
    shutdown_distributed()  # deterministic teardown: no rank may abort at interpreter exit


if __name__ == "__main__":
    main()
