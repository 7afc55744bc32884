"""The one exception type a user should ever see from refusal_lab, and how a stopped run is told apart."""


class ConfigError(ValueError):
    """Bad input from the user: the message says what is wrong and how to fix it.

    Raised before any heavy work, so a mistyped option costs seconds, not a model load.
    """


class Interrupted(BaseException):
    """The run was stopped by a signal: SIGTERM is how SLURM ends a preempted or timed-out job.

    A BaseException, like KeyboardInterrupt, so no ``except Exception`` on the way swallows it; the runner
    records the run as interrupted, with what had finished, and the entry point exits with 128 + the signal.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
