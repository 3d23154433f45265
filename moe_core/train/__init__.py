"""The training loop one trial runs, alone (`moe-sweep train`) or under the orchestrator.

Modules: `config` (TrainConfig), `loop` (train_trial), `batches`, `schedule`, `checkpoint`,
`metrics`, `callbacks`. Import from them directly (re-exporting here would make a cycle with
`moe_core.trial`).
"""
