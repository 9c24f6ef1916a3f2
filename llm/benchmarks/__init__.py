"""Downstream benchmarks through EleutherAI's lm-evaluation-harness: the model as lm-eval's `LM`
(harness.py), the tasks a run names (tasks.py) and the one every run can build from its own
validation split (continuation.py). Used after training (`make eval TASKS=`, llm/tools/) and during
it (`--eval_tasks=`, llm/train/in_loop_eval.py)."""
