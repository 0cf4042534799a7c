"""The `report:` section of a recipe (`ReportConfig`) and the paper's numbers the report shows side by side.

The paper: Zeng et al., "On Diversified Preferences of Large Language Model Alignment", arXiv 2312.07401, Tables 1
and 2; its numbers are constants here, for comparison only. A leaf of the report package: imports nothing of the
pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field


PAPER_CITATION = (
    'Zeng et al., "On Diversified Preferences of Large Language Model Alignment", '
    "arXiv 2312.07401 (EMNLP Findings 2024)"
)

# Table 2: 5-source mixture, test accuracy (%) averaged over the 5 sources, and ECE (M=10) over the 5
# sources. "top" = the best single-source RM.
PAPER_TABLE2 = {
    "pythia-1.4b": {"multitask": (62.38, 0.0541), "more": (63.34, 0.0364), "top": (65.51, 0.0362)},
    "pythia-2.8b": {"multitask": (64.00, 0.0456), "more": (64.01, 0.0366), "top": (66.13, 0.0342)},
    "llama2-7b": {"multitask": (70.13, 0.0570), "more": (70.32, 0.0458), "top": (69.27, 0.0334)},
}
# Table 1: Helpful & Harmless average ECE, MultiTask -> MORE (accuracy within 1 point), and the
# GPT-4-judged rejection-sampling alignment of Alpaca-7B, MORE RM vs MultiTask RM: win/tie/lose (%).
PAPER_TABLE1 = {
    "pythia-1.4b": {"hh_ece": (0.0177, 0.0109), "rjs_win_tie_lose": (44, 22, 34)},
    "pythia-2.8b": {"hh_ece": (0.0145, 0.0078), "rjs_win_tie_lose": (45, 21, 34)},
    "llama2-7b": {"hh_ece": (0.0284, 0.0143), "rjs_win_tie_lose": (45, 23, 32)},
}
PAPER_MODELS = tuple(PAPER_TABLE2)
# The formats of the paper's five datasets: a run on other data is "not comparable as is".
PAPER_SOURCE_FORMATS = {"hh-rlhf", "oasst1", "webgpt", "summarize", "more-json"}


@dataclass
class ReportConfig:
    """The `report:` section of a recipe."""

    title: str | None = field(
        default=None, metadata={"help": "Report title; null = 'MORE pipeline report: <recipe name>'."}
    )
    paper_model: str = field(
        default="auto",
        metadata={
            "help": "Paper rows shown side by side: auto (from reward.model_name_or_path, else all), "
            "pythia-1.4b, pythia-2.8b, llama2-7b, all, or none."
        },
    )
    baseline: str = field(default="multitask", metadata={"help": "RM that MORE is compared with in the sentences."})
    include_recipe: bool = field(default=True, metadata={"help": "Append the resolved recipe (YAML)."})

    def __post_init__(self):
        valid = ("auto", "all", "none", *PAPER_MODELS)
        if self.paper_model not in valid:
            raise ValueError(f"report.paper_model must be one of {', '.join(valid)}, got {self.paper_model!r}")


def paper_rows(cfg: ReportConfig, model_name_or_path: str | None) -> list[str]:
    """Which paper base models to show for this run."""
    if cfg.paper_model == "none":
        return []
    if cfg.paper_model in PAPER_MODELS:
        return [cfg.paper_model]
    if cfg.paper_model == "auto" and model_name_or_path:
        key = model_name_or_path.lower().replace("_", "-")
        for m, needles in (
            ("pythia-1.4b", ("pythia-1.4b", "pythia-1b4")),
            ("pythia-2.8b", ("pythia-2.8b",)),
            ("llama2-7b", ("llama-2-7b", "llama2-7b")),
        ):
            if any(n in key for n in needles):
                return [m]
    return list(PAPER_MODELS)
