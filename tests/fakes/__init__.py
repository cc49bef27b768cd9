"""Fakes and helpers the tests share (imported as `from fakes import trainer as trainer_fakes`; pytest puts
tests/ on sys.path):

- episode: a scripted engine and task, Qwen-style chat template tokenizer (rollout and episode tests)
- failures: fake engine/task/rollout for collect-failures and evaluate
- trainer: the trainer's fakes (random-stop engine, parity task, failure-set writer, crash injection)
- dist_workers: what each rank runs in the spawned multi-process tests
- dist_cli: `rrr` under torchrun with the trainer fakes (run as a script by test_distributed)
"""
