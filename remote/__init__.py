"""Where a stage runs (a Target: this machine, or a pod found through its stack), how files get
there (rsync over SSH), and detached jobs that outlive the connection (tmux). Only remote/ speaks SSH."""

from remote.target import LocalTarget, Result, SSHTarget, Target, TargetError

__all__ = ["LocalTarget", "Result", "SSHTarget", "Target", "TargetError"]
