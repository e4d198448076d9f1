"""Write one scforge output over and over, until killed. Used by ``test_kill_safe.py``.

    python kill_writer.py MODE OUT

``MODE`` is what is written to ``OUT``:

``best_ckpt``
    Training with ``checkpoint_dir=OUT`` for many epochs; the validation loss is made to
    improve every epoch, so ``OUT/best.ckpt`` is rewritten at the end of each one.
``pretrained``
    ``model.save_pretrained(OUT)`` in a loop.
``adapter``
    ``model.save_adapter(OUT)`` in a loop.

For ``pretrained`` and ``adapter``, every parameter saved by write ``k`` holds the value ``k``
(``k = 0, 1, 2, ...``), so a reader can tell a complete file (one value throughout) from a mix.
``OUT.ready`` appears once the first complete write is in place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

import scforge_scvi as sf
from scforge_scvi.data import pbmc68k_counts
from scforge_scvi.train import LoraSettings

# wide enough that one write takes a while (tens of MB), on few cells and genes
BIG = {"hidden_dim": 256, "num_layers": 4, "num_heads": 4, "max_genes": 16, "dropout": 0.0}


class AlwaysImproving(Callback):
    """Report a validation loss that falls every epoch (runs before BestCheckpoint)."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            trainer.callback_metrics["val_loss"] = torch.tensor(1e6 - trainer.current_epoch)


class Ready(Callback):
    """Touch ``marker`` once a complete ``best.ckpt`` is in place."""

    def __init__(self, marker: Path, best: Path) -> None:
        self.marker, self.best = marker, best

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.best.exists() and not self.marker.exists():
            self.marker.touch()


def _fill(module: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["best_ckpt", "pretrained", "adapter"])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)

    adata = pbmc68k_counts()[:48].copy()
    sf.ScForge.setup_anndata(adata, layer="counts", labels_key="louvain")
    model = sf.ScForge(adata, **BIG)
    ready = Path(f"{args.out}.ready")
    if args.mode == "best_ckpt":
        model.train(
            max_epochs=100_000,
            batch_size=48,
            train_size=0.5,
            validation_size=0.5,
            checkpoint_dir=str(args.out),
            accelerator="cpu",
            enable_progress_bar=False,
            logger=False,
            callbacks=[AlwaysImproving(), Ready(ready, args.out / "best.ckpt")],
        )
        sys.exit("training ended before the writer was killed")
    if args.mode == "adapter":
        model._apply_lora(LoraSettings(rank=128, dropout=0.0))
    save = model.save_pretrained if args.mode == "pretrained" else model.save_adapter
    version = 0
    while True:
        _fill(model.module, float(version))
        save(str(args.out))
        ready.touch()
        version += 1


if __name__ == "__main__":
    main()
