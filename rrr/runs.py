"""Old import path of the run plumbing, kept only for rrr/trainer.py until it uses `rrr.run_dir.RunDir`
(issue 19: the trainer split lands it). New code imports from the modules themselves:
rrr.atomic, rrr.provenance, rrr.run_lock, rrr.parts, rrr.metrics_file and rrr.run_dir.
Delete this file when nothing imports it (`grep -rn "rrr.runs" rrr tests scripts bench`)."""

from rrr.atomic import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_parquet, atomic_write_text
from rrr.metrics_file import MetricsWriter, read_metrics
from rrr.provenance import data_sha256, examples_sha256, git_sha, library_versions, sha256_file
from rrr.run_dir import (changed_keys, check_resumable, claim_run_dir, new_run_dir, plan_run_dir, read_manifest,
                         update_manifest, write_run_files)
from rrr.run_lock import lock_run_dir, unlock_run_dir

__all__ = ["MetricsWriter", "atomic_dir", "atomic_write_bytes", "atomic_write_json", "atomic_write_parquet",
           "atomic_write_text", "changed_keys", "check_resumable", "claim_run_dir", "data_sha256",
           "examples_sha256", "git_sha", "library_versions", "lock_run_dir", "new_run_dir", "plan_run_dir",
           "read_manifest", "read_metrics", "sha256_file", "unlock_run_dir", "update_manifest", "write_run_files"]
