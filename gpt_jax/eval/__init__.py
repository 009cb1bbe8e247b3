"""Evaluation beyond val loss: log-likelihood scoring (`scoring`), tasks scored by it (`tasks`,
`builtin_tasks`), and the lm-evaluation-harness adapter (`lm_eval_adapter`). The command is
`python -m gpt_jax.evaluate`."""
