"""`esft fit` that SIGKILLs itself at a chosen point; tests/test_reliability.py runs it in a subprocess.

ESFT_CRASH=fit:STEP (after optimizer step STEP), checkpoint:N (halfway through writing the N-th checkpoint
file), adapter (halfway through writing adapter.safetensors).
"""

from __future__ import annotations

import io
import os
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    kind, _, arg = point.partition(":")
    if kind == "fit":
        from esft_lightning.module import ESFTModule

        original = ESFTModule.on_train_batch_end

        def after_step(self, outputs, batch, batch_idx):  # noqa: ANN001, ANN202
            original(self, outputs, batch, batch_idx)
            if self.global_step == int(arg):
                die()

        ESFTModule.on_train_batch_end = after_step
    elif kind == "checkpoint":
        import torch

        real_save, calls = torch.save, [0]

        def torn_save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN202
            calls[0] += 1
            if calls[0] != int(arg):
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            die()

        torch.save = torn_save
    elif kind == "adapter":
        import esft_lightning.adapters as adapters

        real_save_file = adapters.save_file

        def torn_save_file(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
            real_save_file(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            die()

        adapters.save_file = torn_save_file
    else:
        raise ValueError(f"unknown ESFT_CRASH point {point!r}")


if __name__ == "__main__":
    install(os.environ["ESFT_CRASH"])
    from esft_lightning.cli import main

    main(sys.argv[1:])
