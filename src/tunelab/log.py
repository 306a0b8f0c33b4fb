"""One console for everything tunelab prints; quiet on non-main processes under accelerate."""

import os

from rich.console import Console

console = Console(highlight=False, stderr=False)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def info(msg: str) -> None:
    if is_main_process():
        console.print(msg)
