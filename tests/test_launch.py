"""Launch configs and scripts: every accelerate/DeepSpeed config parses, every referenced file exists.

(That cpu_2proc.yaml really starts two processes is checked by tests/test_run.py's distributed test.)
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml


REPO = Path(__file__).resolve().parents[1]
ACC = REPO / "accelerate_configs"
DS = REPO / "deepspeed_configs"
SCRIPTS = REPO / "scripts"
EXPECTED = {
    "single_gpu.yaml",
    "multi_gpu.yaml",
    "deepspeed_zero2.yaml",
    "deepspeed_zero3.yaml",
    "deepspeed_zero3_offload.yaml",
    "multi_node.yaml",
    "cpu_2proc.yaml",
}


def test_expected_configs_exist():
    assert EXPECTED <= {p.name for p in ACC.glob("*.yaml")}
    assert {"zero2.json", "zero3.json", "zero3_offload.json"} <= {p.name for p in DS.glob("*.json")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_parses(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACC / name))  # accelerate's own parser: unknown keys fail here
    raw = yaml.safe_load((ACC / name).read_text())
    assert cfg.num_processes == raw["num_processes"] >= 1
    if cfg.distributed_type.value == "DEEPSPEED":
        ds_file = REPO / raw["deepspeed_config"]["deepspeed_config_file"]
        assert ds_file.is_file(), ds_file
        stage = json.loads(ds_file.read_text())["zero_optimization"]["stage"]
        assert f"zero{stage}" in name or (name == "multi_node.yaml" and stage == 3)
        assert raw["deepspeed_config"].get("zero3_init_flag", False) == (stage == 3)
    if name == "cpu_2proc.yaml":
        # MULTI_CPU would make `accelerate launch` start ONE process; MULTI_GPU + use_cpu goes through torchrun
        assert cfg.distributed_type.value == "MULTI_GPU" and raw["use_cpu"] is True and cfg.num_processes == 2
    if name == "multi_node.yaml":
        assert raw["num_machines"] >= 2 and "main_process_ip" in raw
        assert "REPLACE" in (ACC / name).read_text()  # the placeholders are documented


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_deepspeed_json(name):
    cfg = json.loads((DS / name).read_text())
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert cfg[key] == "auto", key  # filled in by the HF Trainer from the recipe
    assert cfg["bf16"]["enabled"] == "auto"
    zero = cfg["zero_optimization"]
    assert zero["stage"] == int(re.search(r"zero(\d)", name).group(1))
    if "offload" in name:
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # save_pretrained gets full weights


def test_deepspeed_json_auto_values_are_filled_by_trainer_args():
    """The HF Trainer's DeepSpeed integration fills every "auto" from TrainingArguments."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        ds = HfTrainerDeepSpeedConfig(json.loads((DS / name).read_text()))
        args = TrainingArguments(
            output_dir="/tmp/unused",
            per_device_train_batch_size=10,
            gradient_accumulation_steps=1,
            learning_rate=1e-6,
            bf16=False,
            use_cpu=True,
            report_to=[],
        )
        ds.trainer_config_process(args)
        cfg = ds.config
        assert cfg["train_micro_batch_size_per_gpu"] == 10 and cfg["gradient_accumulation_steps"] == 1
        assert cfg["gradient_clipping"] == args.max_grad_norm
        assert cfg["bf16"]["enabled"] is False


SCRIPT_NAMES = ["run_table2_reward.sh", "run_table1_rjs.sh", "run_tiny_cpu.sh"]


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_launch_script_is_valid_and_references_existing_files(name):
    from pipeline.config import preset_names

    path = SCRIPTS / name
    text = path.read_text()
    assert path.stat().st_mode & 0o111, "not executable"
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    header = "\n".join(text.splitlines()[:25]).lower()
    assert "hardware" in header and ("time" in header or "hours" in header)
    for ref in re.findall(r"accelerate_configs/[\w.-]+\.yaml", text):
        assert (REPO / ref).is_file(), ref
    for recipe in re.findall(r"--recipe\s+\"?([\w.$-]+)", text):
        if "$" not in recipe:
            assert recipe in preset_names(), recipe
    if re.search(r'--recipe "paper-\$BASE"', text):
        assert all(f"paper-{b}" in preset_names() for b in ("pythia-1.4b", "pythia-2.8b", "llama2-7b"))


def test_table2_script_rejects_unknown_base_model():
    p = subprocess.run(["bash", str(SCRIPTS / "run_table2_reward.sh"), "gpt-5"], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown base model" in p.stderr
