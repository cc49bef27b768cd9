"""Episodes, token-in/token-out: one sequence of ids with one segment id per token."""

from __future__ import annotations

from enum import IntEnum


class Segment(IntEnum):
    PROMPT = 0        # chat-templated system + user task          (template)
    ATTEMPT1 = 1      # first answer, stored or sampled           (model)
    FEEDBACK = 2      # user turn: wrong, write a reflection       (template)
    REFLECTION = 3    # the self-reflection: the only loss tokens  (model)
    RETRY_PROMPT = 4  # user turn: try again                       (template)
    ATTEMPT2 = 5      # the retry                                  (model)
    PAD = 6
