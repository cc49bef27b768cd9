"""`rrr` under torchrun with the trainer fakes (random-stop engine, parity verifier), for the SIGKILL test:
`PYTHONPATH=.:tests torchrun --nproc_per_node=2 tests/fakes/dist_cli.py train ...` runs the real CLI
(process group from torchrun's environment) on every rank."""

import sys

import rrr.engines
from fakes import trainer as trainer_fakes
from rrr import trainer
from rrr.cli import app

rrr.engines.build_engine = lambda cfg, model, tok: trainer_fakes.RandomStopEngine(tok.convert_tokens_to_ids("<|im_end|>"))
trainer.get_task = lambda name: trainer_fakes.ParityTask()
trainer.sync.check_logprob_diff = lambda step, diff, limit: None   # the fake's log-probs are no model's

if __name__ == "__main__":
    app(args=sys.argv[1:])
