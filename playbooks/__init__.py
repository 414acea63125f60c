"""The `fab` tasks: the whole guide as a handful of commands, on a pod or on this machine.

    fab --list
    fab train --stack local --tiny       # everything on this machine, tiny model
    fab train --stack a40 --limit 100    # the A40 test on 100 models
    fab status | fab logs --follow | fab fetch | fab teardown

Tasks are thin: they parse flags, pick the target (remote/stack.py) and call remote/ and the ml CLIs.
"""

from invoke import Collection

from playbooks import cost, prepare, run, serve

TASKS = [
    prepare.setup, prepare.sync, prepare.process, prepare.weights,
    run.train, run.status, run.logs, run.tensorboard, run.fetch,
    serve.serve, serve.infer, serve.teardown, cost.cost,
]  # fmt: skip

namespace = Collection(*TASKS)
