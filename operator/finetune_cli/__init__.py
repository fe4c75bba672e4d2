"""finetune_cli: the `finetune` command and the `kubectl finetune` plugin.

`main` parses and dispatches lazily: `validate` and `crd` need only finetune_api (pydantic, PyYAML), `run` imports the
trainer, and the cluster commands (list, status, watch, logs, suspend, resume, cancel, checkpoints) import the
`kubernetes` client, which comes with the `cli` extra.
"""
