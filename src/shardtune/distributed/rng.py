"""Every rank's random-number state in a checkpoint, without pickles: `rng-<rank>.safetensors`.

Python's and NumPy's generator states become integer tensors, torch's CPU and CUDA states are byte
tensors already; safetensors holds them with no code to run on load (Accelerate's `random_states_N.pkl`
would be a pickle). Written by hand because no library stores these four states in a safe format.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _path(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rng-{rank}.safetensors"


def capture() -> dict[str, torch.Tensor]:
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": torch.tensor([version, *state], dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_cached": torch.tensor([cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore(states: dict[str, torch.Tensor]) -> None:
    py = states["python"].tolist()
    gauss = float(states["python_gauss"][0])
    random.setstate((py[0], tuple(py[1:]), None if gauss != gauss else gauss))
    pos, has_gauss = states["numpy_extra"].tolist()
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), pos, has_gauss, float(states["numpy_cached"][0])))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save(folder: Path, rank: int) -> Path:
    path = _path(folder, rank)
    save_file({k: v.contiguous() for k, v in capture().items()}, str(path))
    return path


def load(folder: Path, rank: int) -> bool:
    """Restore this rank's saved state; False when the checkpoint has none for this rank (another world size)."""
    path = _path(folder, rank)
    if not path.is_file():
        return False
    restore(load_file(str(path)))
    return True
