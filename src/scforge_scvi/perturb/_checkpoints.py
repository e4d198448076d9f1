"""Checkpoints of :class:`~scforge_scvi.ScForgePerturb`: the weights kept after training,
its description in pretrained directories and ``.ckpt`` files (the models' one path,
:class:`~scforge_scvi.model._pretrained.PretrainedMixin`), initialising from them by name
and the same-run check of resuming."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import anndata as ad
import pandas as pd
import torch

from scforge_scvi._logging import logger
from scforge_scvi.data._vocab import GeneVocab
from scforge_scvi.io import Pretrained, read_pretrained, run_differences
from scforge_scvi.io._by_name import load_by_name
from scforge_scvi.model._pretrained import PretrainedMixin
from scforge_scvi.train._callbacks import BestCheckpoint

CHECKPOINT_NAMES = ("best", "final", "last")
#: constructor arguments that are fields of the PerturbConfig
_ARCHITECTURE = (
    "hidden_dim",
    "num_layers",
    "num_heads",
    "ffn_dim",
    "encoder_hidden_dim",
    "dropout",
    "activation",
    "cell_set_len",
)


class PerturbCheckpointMixin(PretrainedMixin):
    """Checkpoint methods of :class:`~scforge_scvi.ScForgePerturb`: what ``train()`` keeps,
    :meth:`use_checkpoint`, :meth:`save_pretrained`, :meth:`load` and what
    :meth:`from_pretrained` builds."""

    def _after_training(
        self,
        best: BestCheckpoint,
        checkpoint_dir: Path | None,
        has_val: bool,
        finish: Callable[[], None] | None = None,
    ) -> None:
        final = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        state = best.best_state  # from best.ckpt after a resume that found no better epoch
        if state is None:
            logger.warning(
                "No validation loss was recorded; 'best' is the final weights."
                if has_val
                else "No validation cells (no 'val' split): 'best' is the final weights. "
                "Declare held-out perturbations to select the checkpoint by validation loss."
            )
            state = final
        self._weights = {"best": state, "final": final}
        self.best_epoch_ = best.best_epoch
        self.best_validation_loss_ = best.best_score
        self._fresh_parameters = set()
        self.module.load_state_dict(self._weights["best"])
        self.active_checkpoint_ = "best"
        self.module.eval()
        for p in self.module.parameters():  # freezing is a training-time policy
            p.requires_grad_(True)
        if best.best_epoch is not None:
            logger.info(
                "Best validation loss %.4f at epoch %d; predict() uses these weights.",
                best.best_score,
                best.best_epoch,
            )
        if finish is not None:  # steps on the kept weights before they are written
            finish()
        if checkpoint_dir is not None:
            self.checkpoint_paths_ = {"last": str(checkpoint_dir / "last.ckpt")}
            if self.module.external_basal_encoder:
                logger.warning(
                    "A pluggable basal encoder cannot be written as a pretrained directory: "
                    "only best.ckpt and last.ckpt are in %s; the 'best' and 'final' weights "
                    "stay in memory.",
                    checkpoint_dir,
                )
                return
            for name in ("best", "final"):
                path = checkpoint_dir / name
                self.save_pretrained(path, checkpoint=name, overwrite=True)
                self.checkpoint_paths_[name] = str(path)

    def _check_resumable(self, path: str | Path, run: dict[str, Any]) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No checkpoint to resume at {path}.")
        saved = self._read_pretrained(path).config
        saved = {"model": saved, **saved.pop("run", {})}
        differences = run_differences(saved, {"model": self.pretrained_config(), **run})
        if differences:  # resuming restores optimizer and scheduler state: the same run only
            raise ValueError(
                "Cannot resume: the configuration differs from the checkpoint's ("
                + "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in differences.items())
                + "). Resuming restores optimizer and scheduler state and is only valid for the "
                "same run; to fine-tune with new settings, start a new run with "
                "ScForgePerturb.from_pretrained(checkpoint, adata) (weights only, fresh optimizer "
                "and schedule)."
            )

    # -- checkpoints -------------------------------------------------------------------------
    def use_checkpoint(self, checkpoint: str) -> None:
        """Load the ``best``, ``final`` or ``last`` weights into the module.

        ``best`` and ``final`` are kept in memory after :meth:`train` (and on disk with
        ``checkpoint_dir``); ``last`` reads Lightning's ``last.ckpt``.
        """
        if checkpoint not in CHECKPOINT_NAMES:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_NAMES}, got {checkpoint!r}.")
        if checkpoint in self._weights:
            state = self._weights[checkpoint]
        elif checkpoint in self.checkpoint_paths_:
            state = read_pretrained(self.checkpoint_paths_[checkpoint]).state_dict
        else:
            raise ValueError(
                f"The {checkpoint!r} weights are not available: they exist after train() in "
                "this Python process, or on disk when training had a checkpoint_dir."
            )
        self.module.load_state_dict(state)
        self.active_checkpoint_ = checkpoint

    def pretrained_config(self) -> dict[str, Any]:
        """The JSON-serialisable description of this model (``config.json``)."""
        setup = self._setup
        return {
            "model_class": type(self).__name__,
            "perturb_config": self.module.config.to_dict(),
            "basal_input": self.basal_input_,
            "genes": list(self.genes_),
            "perturbations": list(self.perturbations_),
            "feature_perturbations": list(self.feature_perturbations_),
            "batches": list(self.batches_),
            "control_label": self.control_label_,
            "setup": {
                k: setup.get(k) for k in ("perturbation_key", "cell_type_key", "batch_key", "layer")
            },
        }

    def _pretrained_vocab(self) -> GeneVocab:
        """The model's genes, in order, as the ``gene_vocab.json`` of its pretrained layout."""
        return GeneVocab.from_genes(self.genes_, source="ScForgePerturb genes")

    def save_pretrained(
        self, path: str | Path, *, checkpoint: str | None = None, overwrite: bool = False
    ) -> Path:
        """Write a pretrained directory (:func:`~scforge_scvi.io.write_pretrained`).

        ``config.json`` (versioned), ``model.safetensors`` and ``gene_vocab.json`` (the
        model's genes), no pickle; the write is atomic, so an interrupted save leaves a
        previous directory at ``path`` intact.

        Parameters
        ----------
        path
            Directory to create.
        checkpoint
            ``"best"`` or ``"final"`` weights kept after training; ``None``: the weights in the
            module now.
        overwrite
            Replace an existing directory (an empty one is always replaced).
        """
        path = Path(path)
        overwrite = overwrite or (path.is_dir() and not any(path.iterdir()))
        if checkpoint is None:
            state = self.module.state_dict()
        elif checkpoint in self._weights:
            state = self._weights[checkpoint]
        else:
            raise ValueError(
                f"No {checkpoint!r} weights in memory; available: {sorted(self._weights)} "
                "(or pass checkpoint=None for the current weights)."
            )
        if self.module.external_basal_encoder:
            raise NotImplementedError(
                "save_pretrained does not yet write a pluggable basal encoder's definition; "
                "use model.save() for such models."
            )
        return self._write_pretrained(path, state, overwrite)

    @classmethod
    def load(cls, dir_path: str, adata: ad.AnnData | None = None, **kwargs: Any) -> Self:
        """Load a model written by :meth:`save` (scvi-tools' format; see its caveats on pickle).

        Takes the arguments of :meth:`scvi.model.base.BaseModelClass.load`.
        """
        model = super().load(dir_path, adata=adata, **kwargs)
        model._fresh_parameters = set()  # saved weights count as trained
        return model

    @classmethod
    def _from_pretrained_object(
        cls, loaded: Pretrained, adata: ad.AnnData, overrides: dict[str, Any]
    ) -> Self:
        saved, state = loaded.config, loaded.state_dict
        arch = saved["perturb_config"]
        kwargs = {**{k: arch[k] for k in _ARCHITECTURE}, **overrides}
        kwargs.setdefault("linear_path", arch.get("linear_path", False))
        if arch["perturbation_features"] == "table" and kwargs.get("perturbation_features") is None:
            # the whole stored table, perturbations without training cells included
            table = state["perturbation_encoder.table"].numpy()
            names = saved.get("feature_perturbations") or saved["perturbations"]
            frame = pd.DataFrame(table, index=pd.Index(names))
            kwargs["perturbation_features"] = frame.drop(index=saved["control_label"])
        model = cls(adata, **kwargs)
        model.init_report_ = model._load_matching(state, saved)
        return model

    def _load_matching(
        self, state: dict[str, torch.Tensor], saved: dict[str, Any]
    ) -> dict[str, list[str]]:
        """Load what fits by name (:func:`~scforge_scvi.io._by_name.load_by_name`)."""
        names = {
            "genes": self.genes_,
            "perturbations": self.perturbations_,
            "batches": self.batches_,
        }
        # the feature table is rebuilt by the constructor (from the saved one unless another
        # was passed), whatever perturbations the new AnnData has
        report = load_by_name(
            self.module,
            state,
            self.module.named_axes(),
            saved,
            names,
            rebuilt=("perturbation_encoder.table",),
        )
        fresh = {k.split(" ")[0] for k in report["initialised"] + report["skipped_shape"]}
        self._fresh_parameters = {n for n, _ in self.module.named_parameters() if n in fresh}
        return report
