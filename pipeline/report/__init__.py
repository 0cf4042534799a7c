"""The report stage: DIR/report.md and DIR/report.json, written from what the other stages wrote
(`pipeline.report.stage`). `python -m pipeline.report` runs it alone with the orchestrator's bookkeeping."""
