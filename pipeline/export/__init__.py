"""Export trained reward models for the RL engines users scale on, each certified on the input the engine builds.

    python -m pipeline.export --run-dir runs/tiny-cpu --out exports/tiny-cpu [--rm more ...] [--fold-temperature]

Each RM becomes a standalone folder that `AutoModelForSequenceClassification` + `AutoTokenizer` load (TRL's
`reward_funcs=[folder]`, OpenRLHF's `--reward_pretrain folder`, verl's `reward_model.model.path=folder`), with an
`export.json` recording the source RM, its fingerprint, the temperature (folded into the head or not) and the
certificate per engine. Parts: `folder` (what the export changes and writes), `engines` (each engine's input and
read-out: TRL's own code, OpenRLHF's and verl's after their cited source), `certify` (engine against pipeline),
`rms` (`export_rm`, `export_run`).

A stage-layer package after `calibration` (it reads the reward stage's RMs and calibration's temperatures); it is
no stage of the pipeline's table: the command runs it on a finished run directory.
"""

from pipeline.export.certify import ENGINES, TOLERANCE, certify
from pipeline.export.rms import export_rm, export_run


__all__ = ["ENGINES", "TOLERANCE", "certify", "export_rm", "export_run"]
