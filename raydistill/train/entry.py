"""The function Ray Train runs on every worker, apart from the training code.

Ray Train's controller unpickles the training function and its config before it asks for a single worker. A
function in ``raydistill.train.worker``, or a ``RunPlan`` in the config, would make it import the model code
(transformers' models, DeepSpeed) first: seconds of every run's start on a small machine, on the critical path.
So this module imports nothing heavy, and the plan reaches the workers as an object reference only they resolve."""

from __future__ import annotations


def train_loop_per_worker(config: dict) -> None:
    """Entry point Ray Train runs on every worker: ``config`` holds the plan's object reference, the attempt
    token and the monitor."""
    import ray

    from raydistill.train.worker import Worker

    Worker(ray.get(config["plan"]), attempt=config.get("attempt"), monitor=config.get("monitor")).run()
