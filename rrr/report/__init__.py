"""`rrr compare`: one report from evaluate and forgetting-check runs.

load (runs → EvalRun per test set) → checks (comparable? named) → tables (CIs, paired deltas; rrr.stats)
→ markdown / plots → command (`run`: writes report.md, the CSVs and the plots).
"""

from rrr.report.command import run
from rrr.report.load import CONTROLS, METRICS
from rrr.report.tables import PREREGISTERED

__all__ = ["CONTROLS", "METRICS", "PREREGISTERED", "run"]
