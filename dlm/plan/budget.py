"""The training budget when the spec sets neither `num_epochs` nor `max_steps`: enough passes over
the document for a small model to learn its facts, bounded by a time budget the reason states.

Measured, not guessed: `make learn` trains made-up fact documents (bench/learn/, 10 to 200 Q/A
pairs and a prose-only one) and docs/learning.md holds the table these constants come from. Peers'
usual default, 3 epochs, left the 20-fact document unlearned (2 of 19 answers on the embedded base);
the rows below are the smallest budget that learned it, with room.
"""

from __future__ import annotations

import math

LEARN_EPOCHS = 20  # passes over the document that made the fact documents' answers stick (docs/learning.md)
MIN_STEPS = 40  # a tiny document still gets this many optimizer steps (one-step epochs learn nothing in 3)
MIN_EPOCHS = 3  # never fewer passes than peers' default, whatever the time budget says
TIME_BUDGET_S = 15 * 60  # the planner's own choice stops here (estimated); a larger document sets num_epochs


def learning_epochs(steps_per_epoch: int, step_seconds: float) -> tuple[int, str]:
    """(epochs, reason) for a document of `steps_per_epoch` optimizer steps an epoch."""
    want = max(LEARN_EPOCHS, math.ceil(MIN_STEPS / max(1, steps_per_epoch)))
    why = f"{want} passes so the document is learned ({LEARN_EPOCHS} epochs, at least {MIN_STEPS} steps; docs/learning.md)"
    per_epoch_s = max(1e-9, steps_per_epoch * step_seconds)
    fits = max(MIN_EPOCHS, math.floor(TIME_BUDGET_S / per_epoch_s))
    budget = f"time budget {TIME_BUDGET_S / 60:g} min"
    if want <= fits:
        return want, f"{why}; est. {want * per_epoch_s / 60:.1f} min, within the {budget}"
    return fits, (
        f"{fits} epochs: {want} would take est. {want * per_epoch_s / 60:.0f} min, over the {budget} "
        f"(never fewer than {MIN_EPOCHS}); set training.num_epochs or max_steps to choose"
    )
