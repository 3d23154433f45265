"""Downstream evaluation: multiple-choice tasks scored as lm-eval-harness scores them.

Modules: `examples` (MCExample, the JSONL task loader), `bible_next_verse` (the built-in offline
task), `tasks` (`resolve_task`: a built-in name or a JSONL file) and `multiple_choice`
(`score_choices`, the only one that needs torch). Nothing is imported here, so configs can
check task names without importing torch.
"""
