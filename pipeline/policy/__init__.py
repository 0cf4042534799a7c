"""The base policy (built or named) that the align stage and a `dpo` RM start from, and the tiny policy's warm
start. The stage lives in `pipeline.policy.stage`."""
