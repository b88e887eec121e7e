"""TensorBoard on rank 0 only; every other rank gets a logger that does nothing."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import Tensor


class NullLogger:
    def scalar(self, tag: str, value: float, step: int) -> None: ...
    def image(self, tag: str, img: Tensor, step: int) -> None: ...
    def text(self, tag: str, text: str, step: int) -> None: ...
    def close(self) -> None: ...


class TBLogger(NullLogger):
    def __init__(self, logdir: Path, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        # on resume, drop events an interrupted run logged past the checkpoint it resumes from
        self.writer = SummaryWriter(str(logdir), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, img: Tensor, step: int) -> None:
        self.writer.add_image(tag, img, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


def make_logger(logdir: Path, is_main: bool, purge_step: Optional[int] = None) -> NullLogger:
    return TBLogger(logdir, purge_step) if is_main else NullLogger()
