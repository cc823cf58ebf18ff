"""``vembed prepare``: public data sets and the user's own files → validated, seeded JSONL splits.

One module per source (:mod:`.sop`, :mod:`.flowers102`, :mod:`.imagefolder`, :mod:`.tabular` for
JSONL/CSV; for segmentation :mod:`.segfolder`, :mod:`.voc`, :mod:`.ade20k` with :mod:`.segmasks`), sharing the checks (:mod:`.validate`), the splitters (:mod:`.splits`), the summary
(:mod:`.summary`) and the atomic writer (:mod:`.output`). Each returns a :class:`PrepareResult`.
"""

from vembed.data.prepare.ade20k import prepare_ade20k
from vembed.data.prepare.flowers102 import prepare_flowers102
from vembed.data.prepare.imagefolder import prepare_imagefolder
from vembed.data.prepare.output import PrepareResult
from vembed.data.prepare.problems import Problem, ProblemLog
from vembed.data.prepare.segfolder import prepare_segfolder
from vembed.data.prepare.sop import prepare_sop
from vembed.data.prepare.tabular import prepare_csv, prepare_jsonl
from vembed.data.prepare.voc import prepare_voc

__all__ = [
    "PrepareResult",
    "Problem",
    "ProblemLog",
    "prepare_ade20k",
    "prepare_csv",
    "prepare_flowers102",
    "prepare_imagefolder",
    "prepare_jsonl",
    "prepare_segfolder",
    "prepare_sop",
    "prepare_voc",
]
