"""Train one rank from a config file and overrides: what ``mnemo train`` and the launcher's worker run."""

from __future__ import annotations


def run_train(config: str, overrides: list[str]) -> int:
    """Train one rank (alone, or under a launcher: the worker calls this); the exit status."""
    import os
    import sys

    from mnemo.train.config import check_memory_fit, load_config

    from mnemo.train.rankenv import (
        OPEN_FILES_PER_SOURCE,
        alone,
        check_dist_env,
        check_op_cache,
        check_open_files,
        check_train_device,
        env_int,
        open_files_needed,
        raise_open_files_limit,
    )

    waiting = check_dist_env(os.environ)  # before anything slow: a bad WORLD_SIZE, RANK, ... is one line
    # Below it a rank hung in c10d's store for 600 s. Every rank raises its limit; rank 0 alone warns of a hard
    # limit below a large job's need (64 ranks printed 64 copies of the line, and the launcher its own).
    first = alone(os.environ) or env_int(os.environ, "RANK", 0) == 0
    world = env_int(os.environ, "WORLD_SIZE", 1)
    check_open_files(world, warn=first)
    cfg = load_config(config, overrides)
    # A large data.sources mixture: more files than the CLI's floor, as far as the hard limit allows.
    raise_open_files_limit(open_files_needed(world) + OPEN_FILES_PER_SOURCE * len(cfg.data.sources))
    check_train_device(cfg.train.device)  # imports torch only for train.device=cuda
    from mnemo.train.resume import check_before_start  # after load_config: a typo is answered before torch loads

    check_before_start(cfg)
    check_op_cache(os.environ)
    if alone(os.environ):  # no launcher checked this machine's memory for it (`mnemo launch` does)
        check_memory_fit(cfg)
    if waiting:  # WORLD_SIZE > 1 with no launcher: likely left in the shell; joining waits for the store's timeout
        print(waiting, file=sys.stderr, flush=True)
    # The rank's environment (DS_ACCELERATOR, LOCAL_WORLD_SIZE, ...) must be set
    # before deepspeed or streaming are imported.
    from mnemo.train.rankenv import apply_rank_env

    apply_rank_env(cfg.train.device)
    from mnemo.train.trainer import train

    if alone(os.environ):
        # A `mnemo train` is its own launcher: it holds <run.dir>/launch.lock for its life as a launcher does, so
        # a `mnemo launch` whose ranks are still starting (run.lock not yet theirs) refuses it, and it them.
        from mnemo.train.runlock import LaunchLock

        with LaunchLock(cfg.run.dir):
            summary = train(cfg)
    else:
        summary = train(cfg)
    if summary.get("exit") == "preempted":
        return 0
    return 0
