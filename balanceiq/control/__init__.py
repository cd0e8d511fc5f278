"""The control loop's safety layer: guardrails, operator overrides and policy rollback."""
