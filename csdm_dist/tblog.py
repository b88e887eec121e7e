"""TensorBoard on rank 0 only; every other rank gets a logger that does nothing."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor


class NullLogger:
    def scalar(self, tag: str, value: float, step: int) -> None: ...
    def image(self, tag: str, img: Tensor, step: int) -> None: ...
    def text(self, tag: str, text: str, step: int) -> None: ...
    def close(self) -> None: ...


class TBLogger(NullLogger):
    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logdir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, img: Tensor, step: int) -> None:
        self.writer.add_image(tag, img, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


def make_logger(logdir: Path, is_main: bool) -> NullLogger:
    return TBLogger(logdir) if is_main else NullLogger()
