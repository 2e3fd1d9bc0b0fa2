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
        ptq_sqnr_db=5.7,
        seconds=9,
        source=(
            '`python -m tools.bench.auto --write-table --calib 8 --eval 8 --size 96 '
            '--backends qnnpack`, 8/8 crops at 96×96, tf_efficientnet_lite0, 2026-12-06, '
            'commit 8a5b8ba'
        ),
    ),
)
