"""The measured recipe table (see ``qpasses.passes.recipes``): each row written by
``python -m tools.bench.auto --write-table`` (its ``source`` says which run). Do not edit: rerun it.
"""

from qpasses.passes.recipes import Recipe

MEASURED: tuple[Recipe, ...] = (
    Recipe(
        backend='qnnpack',
        per_channel=False,
        weight_bits=8,
        passes=('cle', 'hba', 'biascorrection'),
        sqnr_db=15.7,
        ptq_sqnr_db=4.2,
        seconds=164,
        source=(
            '`python -m tools.bench.auto --write-table --calib 16 --eval 32 --threads 1`, '
            '2026-12-06, commit 448adfc'
        ),
    ),
    Recipe(
        backend='x86',
        per_channel=True,
        weight_bits=8,
        passes=('biascorrection',),
        sqnr_db=22.8,
        ptq_sqnr_db=16.9,
        seconds=18,
        source=(
            '`python -m tools.bench.auto --write-table --calib 16 --eval 32 --threads 1 '
            '--backends x86`, 2026-12-07, commit 0824214'
        ),
    ),
    Recipe(
        backend='onednn',
        per_channel=True,
        weight_bits=8,
        passes=('biascorrection',),
        sqnr_db=22.2,
        ptq_sqnr_db=16.8,
        seconds=179,
        source=(
            '`python -m tools.bench.auto --write-table --calib 16 --eval 32 --threads 1`, '
            '2026-12-06, commit 448adfc'
        ),
    ),
)
