"""``train.remine_every``: mine the training set's hard negatives again with the model being trained.

:class:`ReminingSampler` wraps the P x K sampler of a ``train.hard_negatives`` run. Setting epoch ``e``
(``e > 0``, a multiple of ``remine_every``) first embeds the training records with the current model
(eval transform, dropout off, the training RNG streams untouched), mines them like ``vembed mine``
(same k, margin and category rule as the records were mined with: :data:`MINE_DEFAULTS` unless given)
and hands the sampler the new negatives. The main process mines and sends the result to the others, so
every rank builds the same batches. :meth:`state_dict` (the negatives in use and the epoch they were
mined at) goes into each checkpoint, so a run resumed mid-epoch uses the negatives it had, not ones
mined again from a half-trained model.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from vembed.console import log
from vembed.data.samplers import PKBatchSampler
from vembed.errors import VembedError

MINE_DEFAULTS = {"k": 8, "margin": 0.05, "same_category": False}


class ReminingSampler:
    """A :class:`PKBatchSampler` with mined negatives, re-mined every ``every`` epochs."""

    def __init__(
        self,
        sampler: PKBatchSampler,
        *,
        every: int,
        mine,  # () -> list[list[int]]: negatives of every record under the current model
        broadcast=None,  # (list, from main) -> the main process' list, on every rank
        is_main: bool = True,
        show_progress: bool = True,
    ):
        if sampler.hard_negatives is None:
            raise VembedError(
                "train.remine_every needs train.hard_negatives (mined negatives in the batches)"
            )
        self.sampler = sampler
        self.every = every
        self.mine = mine
        self.broadcast = broadcast
        self.is_main = is_main
        self.show_progress = show_progress
        self.mined_epoch = 0  # 0: the negatives the records came with

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        return iter(self.sampler)

    @property
    def hard_negatives(self) -> int:
        return self.sampler.hard_negatives

    def set_epoch(self, epoch: int) -> None:
        due = epoch - epoch % self.every
        if due > 0 and due != self.mined_epoch:
            self._remine(due)
        self.sampler.set_epoch(epoch)

    def _remine(self, epoch: int) -> None:
        negatives = None
        if self.is_main:
            with torch.random.fork_rng(devices=[]):
                negatives = self.mine()
        if self.broadcast is not None:
            negatives = self.broadcast(negatives)
        self.sampler.set_negatives(negatives)
        self.mined_epoch = epoch
        if self.is_main and self.show_progress:
            log(
                f"epoch {epoch}: re-mined hard negatives with the current model "
                f"({sum(map(len, negatives)) / max(len(negatives), 1):.1f} per record)"
            )

    def state_dict(self) -> dict:
        return {"mined_epoch": self.mined_epoch, "negatives": self.sampler._negatives}

    def load_state_dict(self, state: dict) -> None:
        self.mined_epoch = int(state["mined_epoch"])
        self.sampler.set_negatives(state["negatives"])


def remining(sampler: PKBatchSampler, embedder, data, settings, accelerator, *, show_progress: bool):
    """The :class:`ReminingSampler` of a run: mines ``data.records`` with ``embedder`` on the main process."""
    from accelerate.utils import broadcast_object_list

    from vembed.inference import embed_options, embed_records
    from vembed.mining import mine_negatives

    options = dict(MINE_DEFAULTS)
    same_category = options["same_category"] or _mined_within_categories(data)
    labels = data.labels
    categories = [rec.category for rec in data.records] if same_category else None

    def mine() -> list[list[int]]:
        with torch.inference_mode():
            how = embed_options(settings, show_progress=show_progress)
            found = embed_records(
                embedder, data.records, replace(how, skip_bad=False), description="re-mining"
            )
        if len(found.indices) != len(data.records):
            raise VembedError("re-mining: some training images did not decode")
        k = max((len(rec.negatives or ()) for rec in data.records), default=0) or options["k"]
        return mine_negatives(
            found.embeddings,
            labels,
            k=k,
            margin=options["margin"],
            categories=categories,
            same_category=same_category,
        ).negatives

    def broadcast(value):
        if accelerator.num_processes == 1:
            return value
        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    return ReminingSampler(
        sampler,
        every=settings.train.remine_every,
        mine=mine,
        broadcast=broadcast,
        is_main=accelerator.is_main_process,
        show_progress=show_progress,
    )


def _mined_within_categories(data) -> bool:
    """Whether the records' negatives all share their anchor's category (mined with --same-category)."""
    if data.categories is None:
        return False
    where = {rec.image: rec.category for rec in data.records}
    rows = [(rec.category, rec.negatives) for rec in data.records if rec.negatives]
    return bool(rows) and all(where.get(path) == category for category, paths in rows for path in paths)
