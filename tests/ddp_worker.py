"""train.run on test_train's repeat task with the flags given: tests/test_scale.py starts it under torchrun.
`--settings JSON` (first) carries train.parse_args's settings: values of flags.SETTINGS, which are no flags.

    PYTHONPATH=. python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py \
        --settings '{"rollout_batch": 2}' --out D ...
"""

import json
import sys

import model as M
import train
from test_train import repeat_task

if __name__ == "__main__":
    argv, settings = sys.argv[1:], {}
    if argv[:1] == ["--settings"]:
        settings, argv = json.loads(argv[1]), argv[2:]
    args = train.parse_args(argv, settings=settings)
    _, tok = M.load_model(args.model)
    train.run(args, repeat_task(tok))
