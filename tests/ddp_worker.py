"""train.run on test_train's repeat task with the flags given: tests/test_scale.py starts it under torchrun.

    PYTHONPATH=. python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py --out D ...
"""

import sys

import model as M
import train
from test_train import repeat_task

if __name__ == "__main__":
    args = train.parse_args(sys.argv[1:])
    _, tok = M.load_model(args.model)
    train.run(args, repeat_task(tok))
