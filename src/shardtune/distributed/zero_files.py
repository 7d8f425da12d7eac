"""DeepSpeed ZeRO checkpoint files, read and converted without a strategy: where they live, DeepSpeed's universal
conversion, and the whole model's weights in one process. A leaf of the strategy layer, so that the DCP strategies
(base.py) can take the weights of a ZeRO checkpoint without importing zero.py, which imports them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

FOLDER, TAG = "zero", "state"


def to_universal(folder: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal, in this process (one worker: it forks otherwise)."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = out.with_name(out.name + ".tmp")
    args = argparse.Namespace(
        input_folder=str(folder / TAG), output_folder=str(tmp / TAG), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # progress bars
        ds_to_universal(args)
    os.replace(tmp, out)


def consolidated_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from a ZeRO checkpoint, in one process (DeepSpeed's own consolidation)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(Path(ckpt) / FOLDER), tag=TAG)
