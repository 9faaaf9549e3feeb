"""Face-adapter tests: tiny models, so one thread (threads only contend on a shared CPU)."""

import torch

torch.set_num_threads(1)
