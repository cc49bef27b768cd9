"""`make bench`: rrr against what a user would pick instead (TRL GRPOTrainer, raw generate, vLLM).

Run from the repository root: `python -m bench.run model=smollm2-135m`. Not installed with rrr.
"""
