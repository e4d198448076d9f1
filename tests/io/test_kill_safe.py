"""Kill-safe writes: a process killed (SIGKILL) while it writes ``best.ckpt``, a pretrained
directory or an adapter directory leaves the previous, complete output in place, and the
partial one it was writing is never read in its place.

Each writer (``kill_writer.py``) rewrites its output in a loop; it is killed as soon as the
temporary file or directory of a new write appears, i.e. in the middle of writing it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import setup_counts
from scforge_scvi import ScForge
from scforge_scvi._errors import ScForgeError
from scforge_scvi.io import _pretrained as io_pretrained
from scforge_scvi.io import read_pretrained

WRITER = Path(__file__).with_name("kill_writer.py")
sys.path.insert(0, str(WRITER.parent))
from kill_writer import BIG  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def _temporaries(path: Path) -> list[Path]:
    """Hidden siblings an atomic write of ``path`` creates (``.NAME.*``)."""
    return sorted(path.parent.glob(f".{path.name}.*"))


def _kill_mid_write(mode: str, out: Path, target: Path, timeout: float = 240) -> list[Path]:
    """Start the writer, wait for a complete ``target``, SIGKILL it once a new write of
    ``target`` has begun; return the temporaries it left."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), mode, str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ready = Path(f"{out}.ready")
    deadline = time.monotonic() + timeout
    try:
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the writer never completed a first write"
            time.sleep(0.01)
        while not _temporaries(target):  # the next write has started
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the writer never started a second write"
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return _temporaries(target)


def _single_value(state: dict[str, torch.Tensor]) -> float:
    """The one value every floating-point tensor holds (the writer's version number)."""
    values = {float(v.flatten()[0]) for v in state.values() if v.is_floating_point()}
    for v in state.values():
        if v.is_floating_point():
            assert torch.all(v == v.flatten()[0]), "a tensor mixes two writes"
    assert len(values) == 1, f"tensors of different writes: {sorted(values)[:5]}"
    return values.pop()


@pytest.fixture(scope="module")
def cells(_pbmc68k_counts_once):
    adata = setup_counts(_pbmc68k_counts_once[:48].copy())
    return adata


def test_killed_while_writing_best_ckpt(tmp_path, cells):
    run = tmp_path / "run"
    left = _kill_mid_write("best_ckpt", run, run / "best.ckpt")
    best = read_pretrained(run / "best.ckpt")  # the previous best: complete
    assert best.state_dict and all(torch.isfinite(v).all() for v in best.state_dict.values())
    ckpt = torch.load(run / "best.ckpt", map_location="cpu", weights_only=True)
    assert {"optimizer_states", "lr_schedulers", "loops"} <= set(ckpt)  # still resumable
    model = ScForge.from_pretrained(str(run / "best.ckpt"), cells)
    assert np.isfinite(model.get_latent_representation(indices=np.arange(8))).all()
    assert left, "the kill should have left the partial temporary file"
    for partial in left:  # hidden, and refused if someone points at it
        assert partial.name.startswith(".best.ckpt.")
        with pytest.raises(ScForgeError, match="could not be read as a checkpoint"):
            read_pretrained(partial)


def test_killed_while_saving_a_pretrained_directory(tmp_path, cells):
    out = tmp_path / "model"
    left = _kill_mid_write("pretrained", out, out)
    version = _single_value(read_pretrained(out).state_dict)  # one complete write
    model = ScForge.from_pretrained(str(out), cells)
    assert model.backbone_config.hidden_dim == BIG["hidden_dim"]
    assert left, "the kill should have left the partial temporary directory"
    for partial in left:
        assert partial.name.startswith(f".{out.name}.")
        try:
            state = read_pretrained(partial).state_dict
        except ScForgeError:  # incomplete: refused
            continue
        # complete: the previous model moved aside mid-swap, or the next one not yet in
        assert _single_value(state) == (version if partial.name.endswith(".old") else version + 1)
    # the next save replaces it cleanly; the leftovers never shadow it
    model.save_pretrained(str(out))
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "gene_vocab.json",
        "model.safetensors",
    ]


def test_killed_while_saving_an_adapter(tmp_path, cells):
    from kill_writer import _fill

    from scforge_scvi.train import LoraSettings

    out = tmp_path / "adapter"
    left = _kill_mid_write("adapter", out, out)
    from safetensors.torch import load_file

    version = _single_value(load_file(str(out / "adapter_model.safetensors")))
    labelled = cells.copy()
    for key in ("_scvi_uuid", "_scvi_manager_uuid"):
        labelled.uns.pop(key, None)
    ScForge.setup_anndata(labelled, layer="counts", labels_key="louvain")
    base = ScForge(labelled, **BIG)
    base.load_adapter(str(out))
    loaded = {k: v for k, v in base.module.adapter_state_dict().items()}
    assert _single_value(loaded) == version
    assert left, "the kill should have left the partial temporary directory"
    for partial in left:
        assert partial.name.startswith(f".{out.name}.")
    other = ScForge(labelled, **BIG)
    other._apply_lora(LoraSettings(rank=128, dropout=0.0))
    _fill(other.module, -1.0)
    other.save_adapter(str(out))
    base.load_adapter(str(out))
    assert _single_value(base.module.adapter_state_dict()) == -1.0


def test_a_save_stopped_between_its_two_renames_keeps_the_previous_directory(
    tmp_path, cells, monkeypatch
):
    """The one instant a directory swap is not atomic: the previous model has been moved
    aside and the new one not yet moved in. Readers then find the previous one, and the next
    save puts things right."""
    torch.manual_seed(0)
    model = ScForge(cells, hidden_dim=16, num_layers=1, num_heads=2, max_genes=16)
    out = tmp_path / "model"
    model.save_pretrained(str(out))
    before = read_pretrained(out).state_dict
    real_replace = os.replace

    def stop_after_the_first_rename(src, dst):
        if Path(dst) == out:  # the new directory moving in: the old one is already aside
            raise KeyboardInterrupt  # stands in for the kill
        real_replace(src, dst)

    monkeypatch.setattr(io_pretrained.os, "replace", stop_after_the_first_rename)
    with torch.no_grad():
        for p in model.module.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(str(out))
    monkeypatch.setattr(io_pretrained.os, "replace", real_replace)
    assert not out.exists()
    reread = read_pretrained(out).state_dict  # the previous model, from .model.old
    assert all(torch.equal(reread[k], v) for k, v in before.items())
    assert np.isfinite(ScForge.from_pretrained(str(out), cells).get_latent_representation()).all()
    model.save_pretrained(str(out))
    after = read_pretrained(out).state_dict
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing left over
